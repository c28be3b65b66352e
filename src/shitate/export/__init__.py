"""Export: a run merged into a plain model folder, and GGUF files for llama.cpp and Ollama."""
