"""An asymmetric Ianvs-style metric declared (y_pred, y_true): words predicted / words expected."""
from sedna.common.class_factory import ClassFactory, ClassType

from core.common.log import LOGGER


@ClassFactory.register(ClassType.GENERAL, alias="length_ratio")
def length_ratio(y_pred, y_true, **kwargs):
    preds = list(y_pred.values()) if isinstance(y_pred, dict) else list(y_pred)
    refs = list(y_true.values()) if isinstance(y_true, dict) else list(y_true)
    LOGGER.info("length_ratio of %d answers", len(preds))
    return sum(len(p.split()) for p in preds) / sum(len(r.split()) for r in refs)
