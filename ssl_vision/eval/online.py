"""Online evaluation during pretraining: a linear probe trained on detached features and a weighted kNN.

:class:`OnlineEvaluator` is the component :class:`~ssl_vision.module.SSLModule` holds as ``online_probe``. It is
the probe's linear layer (``online_probe.weight`` / ``.bias`` in the checkpoint's ``state_dict``), its own SGD
optimizer, and the validation-time kNN + probe accuracy:

* **Probe** (docs/reference.md §10.2, the "online" variant of lightly / solo-learn): one SGD step per training
  micro-batch on the backbone's detached features of the first view, cross-entropy over the labelled samples
  (STL-10's unlabeled images carry -1 and are left out). No gradient reaches the backbone. The probe stays out of
  DDP's gradient sync (the module lists its parameters in ``_ddp_params_and_buffers_to_ignore``); its gradients
  are averaged over processes here.
* **Optimizer state**: the SGD momentum buffers are buffers of this module (``online_probe.weight_momentum`` /
  ``.bias_momentum``, zeros before the first step, which gives the same first update as torch's lazily created
  buffer), handed to the optimizer as its state. So the module's ``state_dict`` -- every checkpoint -- holds them
  next to the weights, as plain tensors, and a resumed run continues the probe's momentum bit for bit; the SGD
  hyper-parameters come from the config (``eval.probe_lr``). Checkpoints written before kept the optimizer's
  state dict in ``checkpoint["ssl_vision"]["probe_optimizer"]``; :func:`upgrade_checkpoint` moves it into the
  buffers when such a checkpoint is loaded.
* **kNN** (docs/reference.md §10.1, :func:`~ssl_vision.eval.knn.knn_accuracy`): the validation loop's loader 0 is
  the bank (train split under the eval transform, ``data.knn_train_subset`` images), loader 1 the test split;
  features are gathered over processes and the kNN runs once on the CPU. The protocol (``k``, ``T``, bank and
  test sizes) is returned with the numbers: ``tools/knn_eval.py`` computes the same number from the checkpoint
  with the same protocol and bank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.eval.knn import knn_accuracy

__all__ = ["EvalSpec", "OnlineEvaluator", "upgrade_checkpoint"]

#: where checkpoints written before the evaluator held its own state kept the probe's optimizer state
_OLD_OPTIMIZER_KEY = "probe_optimizer"


@dataclass
class EvalSpec:
    """Online evaluation during pretraining (``conf/pretrain.yaml: eval``)."""

    knn_k: list[int] = field(default_factory=lambda: [200])  # the first is the reported knn_top1
    knn_temperature: float = 0.1
    probe_lr: float = 0.1
    probe_momentum: float = 0.9


class OnlineEvaluator(nn.Linear):
    """The online linear probe (this ``nn.Linear``: features -> class logits), its optimizer and the online kNN.

    Args:
        feature_dim: D of the backbone's features.
        num_classes: C.
        spec: k, T of the kNN and the probe's SGD settings.
    """

    def __init__(self, feature_dim: int, num_classes: int, spec: EvalSpec | None = None) -> None:
        super().__init__(feature_dim, num_classes)
        nn.init.normal_(self.weight, std=0.01)
        nn.init.zeros_(self.bias)
        self.spec = spec or EvalSpec()
        self.num_classes = num_classes
        self.register_buffer("weight_momentum", torch.zeros_like(self.weight))
        self.register_buffer("bias_momentum", torch.zeros_like(self.bias))
        self._optimizer: torch.optim.Optimizer | None = None
        self._store: dict[int, dict[str, list[torch.Tensor]]] = {}

    # ----------------------------------------------------------------------------------------- probe training
    def optimizer(self) -> torch.optim.Optimizer:
        """The probe's SGD (weight decay 0, dampening 0), its momentum buffers this module's buffers.

        They are (re)attached at every call: moving the module to a device or loading a state_dict may replace the
        buffer tensors, and SGD updates whatever tensor its state holds, in place."""
        if self._optimizer is None:
            self._optimizer = torch.optim.SGD(
                self.parameters(), lr=self.spec.probe_lr, momentum=self.spec.probe_momentum, weight_decay=0.0
            )
        self._optimizer.state[self.weight]["momentum_buffer"] = self.weight_momentum
        self._optimizer.state[self.bias]["momentum_buffer"] = self.bias_momentum
        return self._optimizer

    def train_step(
        self, features: torch.Tensor, labels: torch.Tensor, labeled: int | None = None
    ) -> torch.Tensor | None:
        """One SGD step on ``features`` (N, D), detached here, and ``labels`` (N,) (-1: unlabeled, left out).

        ``labeled`` is the number of labels >= 0 when the caller counted it on the host (the data module does,
        before the batch moves to the device); None counts it here, which reads a device value back. Returns the
        loss (detached), or None when the batch holds no label (no step then)."""
        keep = labels >= 0
        if labeled is None:
            labeled = int(keep.sum())
        if labeled == 0:
            return None
        opt = self.optimizer()
        with torch.autocast(features.device.type, enabled=False):
            logits = self(features.detach().float())
            if labeled == labels.numel():
                loss = F.cross_entropy(logits, labels)
            else:  # the mean over the labelled samples, without gathering them (no host read)
                loss = (F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * keep).sum() / labeled
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(self.parameters())
        opt.step()
        return loss.detach()

    # ----------------------------------------------------------------------------------------- validation
    def start_validation(self) -> None:
        self._store = {0: {"f": [], "y": []}, 1: {"f": [], "y": [], "p": []}}

    def add(self, dataloader_idx: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Loader 0: kNN bank (train split); loader 1: test split (kNN queries and probe predictions)."""
        store = self._store[dataloader_idx]
        features = features.float()
        store["f"].append(features)
        store["y"].append(labels)
        if dataloader_idx == 1:
            store["p"].append(self(features).argmax(1))

    def finish_validation(self) -> tuple[dict[str, float], dict[str, Any]] | None:
        """``(results, protocol)`` over every process's features, or None when a loader gave nothing.

        results: ``knn_top1`` / ``knn_top5`` for the first k, ``knn<k>_top1`` / ``_top5`` for the others,
        ``probe_top1``. protocol: ``{k, ks, temperature, bank_size, test_size}`` (the bank's labelled images)."""
        store, self._store = self._store, {}
        if not store or not store[0]["f"] or not store[1]["f"]:
            return None
        cat = {i: {k: dist.gather_no_grad(torch.cat(v)) for k, v in d.items()} for i, d in store.items()}
        bank_y, test_y = cat[0]["y"], cat[1]["y"]
        keep = bank_y >= 0
        ks = [int(k) for k in self.spec.knn_k]
        bank_f, bank_y = cat[0]["f"][keep].cpu(), bank_y[keep].cpu()
        res = knn_accuracy(
            bank_f,
            bank_y,
            cat[1]["f"].cpu(),
            test_y.cpu(),
            num_classes=self.num_classes,
            ks=ks,
            temperature=self.spec.knn_temperature,
        )
        results = {}
        for i, k in enumerate(ks):
            prefix = "knn" if i == 0 else f"knn{k}"
            results[f"{prefix}_top1"] = res[k]["top1"]
            results[f"{prefix}_top5"] = res[k]["top5"]
        results["probe_top1"] = 100.0 * (cat[1]["p"] == test_y).float().mean().item()
        protocol = knn_protocol(ks, self.spec.knn_temperature, int(bank_f.shape[0]), int(test_y.shape[0]))
        return results, protocol


def knn_protocol(ks: list[int], temperature: float, bank_size: int, test_size: int) -> dict[str, Any]:
    """The kNN protocol that goes with every reported kNN number (``results.json`` and ``tools/knn_eval.py``)."""
    return {
        "k": int(ks[0]),
        "ks": [int(k) for k in ks],
        "temperature": float(temperature),
        "bank_size": int(bank_size),
        "test_size": int(test_size),
    }


def upgrade_checkpoint(checkpoint: dict, prefix: str = "online_probe.") -> None:
    """Move the probe's optimizer state of a checkpoint written before :class:`OnlineEvaluator` held it
    (``checkpoint["ssl_vision"]["probe_optimizer"]``, a torch SGD state dict over [weight, bias]) into the
    evaluator's momentum buffers in the state_dict, in place; zeros where it had none (no step taken yet: the same
    next update). A checkpoint in the current layout, or without a probe, is left as it is."""
    state_dict = checkpoint.get("state_dict")
    if (
        not isinstance(state_dict, dict)
        or f"{prefix}weight" not in state_dict
        or f"{prefix}weight_momentum" in state_dict
    ):
        return
    old = (checkpoint.get("ssl_vision") or {}).pop(_OLD_OPTIMIZER_KEY, None) or {}
    saved = old.get("state") or {}
    for index, name in enumerate(("weight", "bias")):
        buf = (saved.get(index) or {}).get("momentum_buffer")
        param = state_dict[f"{prefix}{name}"]
        if buf is not None and tuple(buf.shape) != tuple(param.shape):
            raise ValueError(
                f"checkpoint['ssl_vision']['probe_optimizer']: momentum buffer {index} has shape "
                f"{tuple(buf.shape)}, the probe's {name} {tuple(param.shape)}"
            )
        state_dict[f"{prefix}{name}_momentum"] = torch.zeros_like(param) if buf is None else buf.to(param)
