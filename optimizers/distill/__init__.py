"""Distilled students: smaller models trained from the uploaded teacher on unlabeled data.

``passes`` registers the ``distill`` pass and its candidate chains; ``transformer`` builds
layer-dropped encoder students, ``cnn`` narrows ONNX CNNs/MLPs (``onnx_module`` trains them),
``trainer`` is the shared loop (AdamW, warm-up, early stopping, budget, cancel).
"""
