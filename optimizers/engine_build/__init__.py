"""Engine build steps: ONNX -> a native runtime engine (TensorRT ``model.plan``)."""
