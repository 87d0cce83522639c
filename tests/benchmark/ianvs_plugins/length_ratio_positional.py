"""The same metric written for Ianvs's call metric(y_true, y_pred), with names that say nothing."""
from sedna.common.class_factory import ClassFactory, ClassType


@ClassFactory.register(ClassType.GENERAL, alias="length_ratio")
def length_ratio(first, second):
    return sum(len(p.split()) for p in second) / sum(len(r.split()) for r in first)
