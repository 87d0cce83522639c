# Re-typed from kubeedge/ianvs examples/federated-llm/fedllm-peft/testenv/rouge1_metric.py (Apache-2.0,
# Copyright 2025 The KubeEdge Authors): same imports, decorator and signature, run unchanged by
# tests/benchmark/test_ianvs_plugins.py.

"""Metric callback that computes ROUGE-1 only."""
from evaluate import load as load_metric
from sedna.common.class_factory import ClassFactory, ClassType

__all__ = ["rouge1_metric"]

@ClassFactory.register(ClassType.GENERAL, alias="rouge1_metric")
def rouge1_metric(y_pred, y_true, **kwargs):
    preds = list(y_pred.values()) if isinstance(y_pred, dict) else list(y_pred)
    refs  = list(y_true.values()) if isinstance(y_true, dict) else list(y_true)
    rouge = load_metric("rouge")
    score = rouge.compute(predictions=preds, references=refs, use_stemmer=True)["rouge1"]
    return round(float(score), 4)
