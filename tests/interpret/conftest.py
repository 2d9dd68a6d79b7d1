"""Fixtures of the interpretation tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def shap_without_jit(monkeypatch):
    """shap with its numba kernels run as the Python functions they compile from: the same values, without numba's
    20-40 s compilation in every fresh process."""
    shap = pytest.importorskip("shap")
    import numba
    from shap.explainers import _partition
    from shap.utils import _masked_model

    for module in (_masked_model, _partition):
        for name, value in list(vars(module).items()):
            if isinstance(value, numba.core.dispatcher.Dispatcher):
                monkeypatch.setattr(module, name, value.py_func)
    return shap
