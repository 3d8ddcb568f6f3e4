"""Train the two demo models shipped in ``model_repository/`` and write them there.

Run: ``.venv/bin/python bench/train_demo_models.py`` (about 20 s on 2 CPU cores);
``--repository DIR --data DIR`` write somewhere else (the tests do).

* ``digits_cnn`` — a small convolutional classifier trained on scikit-learn's bundled 8x8
  handwritten digits (1,797 images). Input ``input`` FP32 ``[-1, 1, 8, 8]`` with raw pixel
  intensities 0..16 exactly as ``sklearn.datasets.load_digits`` gives them (the model scales
  them itself); output ``logits`` FP32 ``[-1, 10]``. Exported with ``torch.onnx.export`` with
  a dynamic batch axis.
* ``wine_mlp`` — a tabular MLP on scikit-learn's bundled wine data (178 samples, 13 chemical
  measurements, 3 cultivars). Input ``features`` FP32 ``[-1, 13]`` (raw measurements; the
  standardization is baked into the graph); outputs ``probabilities`` FP32 ``[-1, 3]``,
  ``class_id`` INT64 ``[-1, 1]`` and ``label`` BYTES ``[-1, 1]`` (the cultivar name, produced by
  an ``ai.onnx.ml`` LabelEncoder), so the demo repository also exercises INT64 and string
  tensors.

Both use a stratified train/test split with a fixed seed; the script prints the test accuracy
and checks that ONNX Runtime reproduces torch's outputs. The held-out test splits are saved
to ``bench/data/`` (the repository keeps only model files and configs). Everything is seeded,
so a rerun trains the same models.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits, load_wine
from sklearn.model_selection import train_test_split
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from serving.model_config import ModelConfig, write_config  # noqa: E402

REPOSITORY = ROOT / "model_repository"
DATA = ROOT / "bench" / "data"
SEED = 0
WINE_CLASSES = ["class_0", "class_1", "class_2"]


def _seed(seed: int = SEED) -> None:
    # One thread: the models are tiny, and OpenMP spin-waiting on a busy machine is 10x slower.
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)


class DigitsCNN(nn.Module):
    """conv(16) -> conv(32) -> maxpool -> fc(64) -> fc(10); about 38 k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x / 16.0))


def _train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch: int = 32
) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
    model.eval()


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean())


def _export(
    model: nn.Module, example: torch.Tensor, path: Path, in_name: str, out_name: str
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter on purpose: it is deterministic and gives a plain Conv/Gemm graph.
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript")
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[in_name],
        output_names=[out_name],
        dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)))


def _dynamic_batching(config: ModelConfig, max_queue_delay_us: int) -> None:
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.dynamic_batching.preferred_batch_size.extend([16, 32])
    group = config.instance_group.add()
    group.count = 1
    group.kind = mc.ModelInstanceGroup.KIND_CPU


def train_digits(repository: Path = REPOSITORY, data: Path = DATA) -> dict[str, float]:
    """Train, export and configure ``digits_cnn``; returns its test accuracy."""
    _seed()
    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=SEED, stratify=digits.target
    )
    model = DigitsCNN()
    _train(model, torch.from_numpy(x_train), torch.from_numpy(y_train), epochs=30, lr=2e-3)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    accuracy = _accuracy(torch_logits, y_test)

    model_path = repository / "digits_cnn" / "1" / "model.onnx"
    _export(model, torch.from_numpy(x_test[:2]), model_path, "input", "logits")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ort_logits = session.run(["logits"], {"input": x_test})[0]
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    if max_diff > 1e-4 or _accuracy(ort_logits, y_test) != accuracy:
        raise SystemExit(f"digits_cnn: onnxruntime differs from torch (max |diff| {max_diff})")

    config = ModelConfig(name="digits_cnn", platform="onnxruntime_onnx", max_batch_size=64)
    config.input.add(name="input", data_type=mc.TYPE_FP32, dims=[1, 8, 8])
    config.output.add(name="logits", data_type=mc.TYPE_FP32, dims=[10])
    _dynamic_batching(config, max_queue_delay_us=500)
    warmup = config.model_warmup.add(name="random_batch", batch_size=8)
    warmup.inputs["input"].data_type = mc.TYPE_FP32
    warmup.inputs["input"].dims.extend([1, 8, 8])
    warmup.inputs["input"].random_data = True
    write_config(model_path.parent.parent, config)

    data.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(data / "digits_test.npz", x=x_test, y=y_test.astype(np.int64))
    return {"test_accuracy": accuracy, "max_abs_diff": max_diff, "bytes": model_path.stat().st_size}


class WineMLP(nn.Module):
    """standardize -> fc(32) -> relu -> fc(3)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))
        self.fc1 = nn.Linear(13, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1((x - self.mean) / self.std)))


def _wine_graph(model: WineMLP) -> onnx.ModelProto:
    """The trained MLP as an ONNX graph with softmax, argmax and a string label output."""

    def const(name: str, tensor: torch.Tensor) -> onnx.TensorProto:
        return numpy_helper.from_array(tensor.detach().numpy().astype(np.float32), name)

    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "std"], ["scaled"]),
        helper.make_node("Gemm", ["scaled", "fc1.weight", "fc1.bias"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["h_relu"]),
        helper.make_node("Gemm", ["h_relu", "fc2.weight", "fc2.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["class_id"], axis=1, keepdims=1),
        helper.make_node(
            "LabelEncoder",
            ["class_id"],
            ["label"],
            domain="ai.onnx.ml",
            keys_int64s=list(range(len(WINE_CLASSES))),
            values_strings=WINE_CLASSES,
            default_string="unknown",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "wine_mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 13])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("class_id", TensorProto.INT64, ["batch", 1]),
            helper.make_tensor_value_info("label", TensorProto.STRING, ["batch", 1]),
        ],
        initializer=[
            const("mean", model.mean),
            const("std", model.std),
            const("fc1.weight", model.fc1.weight),
            const("fc1.bias", model.fc1.bias),
            const("fc2.weight", model.fc2.weight),
            const("fc2.bias", model.fc2.bias),
        ],
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)],
        producer_name="slimserve bench/train_demo_models.py",
    )
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def train_wine(repository: Path = REPOSITORY, data: Path = DATA) -> dict[str, float]:
    """Train, export and configure ``wine_mlp``; returns its test accuracy."""
    _seed()
    wine = load_wine()
    features = wine.data.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        features, wine.target, test_size=0.3, random_state=SEED, stratify=wine.target
    )
    model = WineMLP(x_train.mean(axis=0), x_train.std(axis=0))
    _train(
        model, torch.from_numpy(x_train), torch.from_numpy(y_train), epochs=60, lr=1e-2, batch=16
    )
    with torch.no_grad():
        torch_probs = torch.softmax(model(torch.from_numpy(x_test)), dim=1).numpy()
    accuracy = _accuracy(torch_probs, y_test)

    model_path = repository / "wine_mlp" / "1" / "model.onnx"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(_wine_graph(model), str(model_path))
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    probs, class_id, label = session.run(None, {"features": x_test})
    max_diff = float(np.abs(probs - torch_probs).max())
    expected_labels = np.array([WINE_CLASSES[i] for i in torch_probs.argmax(axis=1)])
    if (
        max_diff > 1e-5
        or not np.array_equal(class_id[:, 0], torch_probs.argmax(axis=1))
        or not np.array_equal(label[:, 0].astype(str), expected_labels)
    ):
        raise SystemExit(f"wine_mlp: onnxruntime differs from torch (max |diff| {max_diff})")

    config = ModelConfig(name="wine_mlp", platform="onnxruntime_onnx", max_batch_size=32)
    config.input.add(name="features", data_type=mc.TYPE_FP32, dims=[13])
    config.output.add(name="probabilities", data_type=mc.TYPE_FP32, dims=[3])
    config.output.add(name="class_id", data_type=mc.TYPE_INT64, dims=[1])
    config.output.add(name="label", data_type=mc.TYPE_STRING, dims=[1])
    _dynamic_batching(config, max_queue_delay_us=200)
    write_config(model_path.parent.parent, config)

    data.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(data / "wine_test.npz", x=x_test, y=y_test.astype(np.int64))
    return {"test_accuracy": accuracy, "max_abs_diff": max_diff, "bytes": model_path.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=REPOSITORY, help="model repository")
    parser.add_argument("--data", type=Path, default=DATA, help="where the test splits go")
    args = parser.parse_args(argv)
    for name, train in (("digits_cnn", train_digits), ("wine_mlp", train_wine)):
        stats = train(args.repository, args.data)
        print(
            f"{name}: test accuracy {stats['test_accuracy']:.4f}, "
            f"max |onnxruntime - torch| {stats['max_abs_diff']:.2e}, "
            f"model.onnx {stats['bytes'] / 1024:.0f} KiB"
        )


if __name__ == "__main__":
    main()
