"""Validation: ONNX Runtime against PyTorch, judged by one rule."""
