"""shitate (仕立て): tailor an open LLM to your own data, on your own machines."""

import os as _os

# No telemetry and no update checks from the libraries we use, set before any of them is imported. Hub access
# itself stays possible: a hub id is the one thing a user can ask for that needs the network.
for _name, _value in (("HF_HUB_DISABLE_TELEMETRY", "1"), ("HF_HUB_DISABLE_UPDATE_CHECK", "1"),
                      ("GRADIO_ANALYTICS_ENABLED", "False"), ("DO_NOT_TRACK", "1")):
    _os.environ.setdefault(_name, _value)

__version__ = "0.1.0"
