import threading

import pytest

from shitate.errors import StoppedAtExit
from shitate.models.inference import _InFlight


def test_work_started_after_exit_began_does_not_run():
    in_flight = _InFlight()
    in_flight.stop_all(timeout=1.0)
    ran = []
    with pytest.raises(StoppedAtExit):
        with in_flight.work():
            ran.append(True)
    assert ran == []


def test_exit_waits_for_work_in_flight_and_stops_it():
    in_flight = _InFlight()
    started, outcome = threading.Event(), []

    def worker():
        try:
            with in_flight.work():
                started.set()
                in_flight.exiting.wait(timeout=30)  # as generate does: ends once the stop is asked for
        except StoppedAtExit:
            outcome.append("stopped")

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait(timeout=30)
    in_flight.stop_all(timeout=30)
    thread.join(timeout=30)
    assert outcome == ["stopped"]
