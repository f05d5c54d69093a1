"""The shape ranges the ONNX pass tests export all-MiniLM-L6-v2 over: small, so export,
calibration and ONNX Runtime runs stay fast on the 2-core CI machine."""

from optimize.runtime.config import CompileConfig

CONFIG = CompileConfig(max_batch=4, max_seq=32)
