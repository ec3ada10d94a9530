"""qwenvl-dq: W8A8 static int8 quantization of Qwen2-VL, layer by layer, in msModelSlim's output layout."""

__version__ = "0.1.0"
