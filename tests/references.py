"""Reference implementations the tests compare the harness against (test-only code).

* ``loglik_reference``: the model's own log-likelihood of each cloze continuation, lm-eval's
  score, computed the slow, obvious way (was ``calibrate.engine.cloze.loglik_reference``).
"""

from __future__ import annotations

import numpy as np
import torch

from calibrate.model.load import LoadedModel
from calibrate.tasks.continuations import ClozeRequest


def loglik_reference(loaded: LoadedModel, request: ClozeRequest) -> np.ndarray:
    """[K] the model's own summed log-probabilities of each continuation (lm-eval's score).

    Each context + continuation runs alone, from scratch, through the full model (``model(...)``,
    its own final norm and head); log-softmax over the vocabulary, gathered at the continuation.
    """
    n = len(request.context_ids)
    out = []
    with torch.inference_mode():
        for cont in request.continuations:
            ids = torch.tensor([request.context_ids + cont], device=loaded.device)
            logits = loaded.model(input_ids=ids).logits[0, n - 1:-1].double()
            target = torch.tensor(cont, device=logits.device)[:, None]
            out.append(float(torch.log_softmax(logits, -1).gather(1, target).sum()))
    return np.array(out)
