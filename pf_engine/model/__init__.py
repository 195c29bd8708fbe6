"""What a model is: its config (config.py), its weights from safetensors or GGUF (loading.py,
gguf_import.py, bundled.py for the default model), and the decoder that runs them (decoder.py).
Nothing here knows about personas, backends' internals or the scheduler."""
