"""Classifier heads: small scikit-learn-style estimators trained on cached embeddings.

Five kinds, built with :func:`make_head` (``make_head("logreg", C=0.01)``):

``logreg``
    Multinomial logistic regression (softmax + L2). Solved by full-batch L-BFGS in torch on standardised
    float32 features, fusing each forward and backward pass over cache-sized row blocks so the features are
    read once per iteration. It stops when the loss improves by less than ``tol``. On a 2-core CPU it
    trains 60k x 1280 (Fashion-MNIST features) in ~5 s where scikit-learn's float64 lbfgs needs ~43 s for
    the same objective, at the same accuracy (``benchmarks/bench_train.py``). On CUDA it runs on the GPU.
``linear_svm``
    One-vs-rest linear SVM with LinearSVC's squared-hinge loss, solved the same way. Probabilities come from
    one Platt sigmoid per class fitted on 3-fold out-of-fold decision values, normalised to sum to one
    (what ``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` does).
``svm``
    RBF-kernel SVC (libsvm), its one-vs-one decision values turned into one-vs-rest scores and calibrated
    the same way. Its cost grows at least quadratically with the number of samples, so it refuses sets
    larger than ``max_samples`` (5,000 by default, ~14 s to train on a 2-core CPU): use it for small sets.
``zero_shot``, ``few_shot``
    Cosine heads built from a text-image model's text vectors of class prompts, with no labelled image
    (``zero_shot``) or starting there and trained on a few labelled vectors (``few_shot``): ``zero_shot.py``.

Every head except the cosine ones standardises the features (StandardScaler's statistics); each predicts with
plain numpy from the arrays returned by :meth:`Head.to_arrays`, so a head rebuilt from those arrays (see
:mod:`classifier.persist`) gives bit-identical predictions. Labels may be strings or integers.
``predict`` is always the arg-max of ``predict_proba``, so the two never disagree.

Threads: training uses torch's intra-op threads as the process has them set; this package never changes
them (``torch.set_num_threads`` is process-wide and also clears oneDNN's primitive cache). On a small CPU
that is busy with other work (e.g. embedding), give the training process one torch thread: two OpenMP
threads then wait on each other at every barrier, and small fits were measured 10-40x slower.

Modules of one job each: ``validation.py`` (feature, label and model checks; the errors), ``base.py``
(:class:`Head`, standardisation), ``linear_solver.py`` (torch L-BFGS for the linear objectives), ``logreg.py``,
``svm.py`` (``linear_svm``, ``svm`` and their Platt calibration), ``kinds.py`` (:func:`make_head` by name).
"""
from __future__ import annotations

from .base import Head, standardization
from .kinds import HEADS, LABEL_HEADS, head_params, make_head
from .logreg import LogRegHead
from .svm import LinearSVMHead, SVMHead
from .validation import HeadError, InsufficientDataError, check_features, check_same_model
from .zero_shot import FewShotHead, ZeroShotHead, class_vectors

__all__ = ["HEADS", "LABEL_HEADS", "FewShotHead", "Head", "HeadError", "InsufficientDataError", "LinearSVMHead", "LogRegHead",
           "SVMHead", "ZeroShotHead", "check_features", "check_same_model", "class_vectors", "head_params",
           "make_head", "standardization"]
