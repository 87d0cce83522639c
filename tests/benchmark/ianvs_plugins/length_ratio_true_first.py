"""The same metric declared (y_true, y_pred), under a function name that is not its alias."""
from sedna.common.class_factory import ClassFactory, ClassType


@ClassFactory.register(ClassType.GENERAL, alias="length_ratio")
def ratio_of_lengths(y_true, y_pred, **kwargs):
    return sum(len(p.split()) for p in y_pred) / sum(len(r.split()) for r in y_true)
