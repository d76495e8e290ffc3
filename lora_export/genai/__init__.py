"""onnxruntime-genai: the KV-cache decoder and generation."""
