"""The classifier router of the BEIR evaluation (ExpertClassifierRouter-style baseline): never
served, so it lives with the evaluation, not with the online routing policies."""

from __future__ import annotations

import numpy as np

from actors.routing import l2_normalize


class LinearExpertClassifier:
    """ExpertClassifierRouter-style baseline: softmax regression from a query's base embedding to
    the expert of its training domain (trained with torch, full batch, L2-regularised)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, names: list[str]):
        self.weight, self.bias, self.names = weight, bias, list(names)

    @classmethod
    def fit(cls, x: np.ndarray, labels: list[str], epochs: int = 300, lr: float = 0.1, weight_decay: float = 1e-4, seed: int = 0):
        import torch

        names = sorted(set(labels))
        if len(names) < 2:
            raise ValueError("a classifier router needs training queries of at least 2 experts")
        torch.manual_seed(seed)
        xt = torch.as_tensor(l2_normalize(x))
        yt = torch.as_tensor([names.index(label) for label in labels])
        layer = torch.nn.Linear(xt.shape[1], len(names))
        opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(layer(xt), yt)
            loss.backward()
            opt.step()
        return cls(layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy(), names)

    def scores(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(x) @ self.weight.T + self.bias

    def predict(self, x: np.ndarray) -> list[str]:
        return [self.names[int(i)] for i in np.argmax(self.scores(x), axis=1)]
