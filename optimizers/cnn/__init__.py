"""CNN compression techniques: Winograd convolution, calibrated static INT8, channel pruning.

Modules (one job each): ``graph`` (small ONNX helpers), ``winograd`` (the F(2x2,3x3) rewrite),
``winograd_select`` (per-layer measurement and choice), ``int8`` (static QDQ quantization with
calibration and sensitive-layer exclusion), ``torch_graph`` (runs a conv ONNX graph in torch for
gradients), ``prune`` (retraining-free channel pruning), ``timing`` (ORT latency medians),
``zoo`` (reference CNNs for measurements), ``passes`` (the pipeline passes).
"""
