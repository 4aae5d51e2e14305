"""Classifier heads trained on cached embeddings: fit in seconds, evaluate, save and load without pickle.

    from classifier import make_head, evaluate, save_head, load_head

    head = make_head("logreg").fit(vectors, labels, model_id=embedder.model_id)
    head.predict(new_vectors, model_id=embedder.model_id)      # labels; predict_proba for probabilities
    save_head(head, "heads/", head_id="shoes", metrics=evaluate(make_head("logreg"), vectors, labels).to_dict())
    head = load_head("heads/shoes", expected_model_id=embedder.model_id)

Plain arrays in and out; nothing here knows about the service (the service reads vectors from its store
and calls these functions).
"""
from .adapt import AdaptationError, DomainAdapter
from embedder.results import CurvePoint

from .evaluate import (ClassReport, Evaluation, evaluate, evaluation_from_predictions, learning_curve,
                       plot_confusion, plot_learning_curve)
from .heads import (HEADS, LABEL_HEADS, Head, HeadError, InsufficientDataError, LinearSVMHead, LogRegHead, SVMHead, check_features,
                    head_params, make_head)
from .persist import (FORMAT_VERSION, HeadFormatError, HeadInfo, HeadNotFoundError, check_head_id, delete_head,
                      list_heads, load_head, new_head_id, read_head_info, recover_interrupted, save_head)
from .multitask import MultiTaskHead
from .places import HeadFolder, HeadPlace
from .registry import HeadRegistry, TopK, TrainResult

__all__ = [
    "AdaptationError", "CurvePoint", "DomainAdapter", "MultiTaskHead", "FORMAT_VERSION", "learning_curve",
    "plot_learning_curve", "HEADS", "LABEL_HEADS", "ClassReport", "Evaluation", "Head", "HeadError", "HeadFormatError", "HeadInfo",
    "HeadFolder", "HeadNotFoundError", "HeadPlace", "HeadRegistry", "InsufficientDataError", "TopK", "TrainResult", "LinearSVMHead", "LogRegHead", "SVMHead", "check_features",
    "check_head_id", "delete_head", "evaluate", "evaluation_from_predictions", "head_params", "list_heads",
    "load_head", "make_head", "new_head_id", "plot_confusion", "read_head_info", "recover_interrupted", "save_head",
]
