"""A model's own stability profile under the label's noise, measured on reference images it was trained on.

The stability ratio of a sample (the share of Gaussian-noise copies that keep its prediction) depends on the sample
and on the model: at the noise levels of the meta-network study (sigma ~1 in normalised units, a noise norm about
that of the image) some models keep almost every prediction and others flip most of them towards one or two
"noise classes". A model's layer outputs on the clean sample say little about that. Its behaviour under the same
noise on other images says it directly. `noise_profile_features` summarises, for each sample, that behaviour on a
reference set (the model's own training images, never the meta-network's samples):

0. **self-calibrated stability**: an isotonic fit (`sklearn.isotonic.IsotonicRegression`, increasing, clipped to
   [0, 1]) of the reference images' stability on their clean max softmax, read at the sample's max softmax: a
   per-model calibration of confidence into stability, with nothing learnt across models;
1. **class stability**: the mean stability of the reference images the model predicts as the sample's predicted
   class (the overall mean where it predicts none as that class);
2. **class share**: the share of the reference images' noisy predictions that are the sample's predicted class;
3. **runner-up share**: the same share for the sample's second-ranked class;
4. **mean stability**: the model's mean stability over the reference images.

All five are aligned across models (classes and probabilities, not units), so a meta-network can compare them from
one model to the next.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["NOISE_PROFILE_COLUMNS", "noise_profile_features"]

#: The columns of `noise_profile_features`, in order.
NOISE_PROFILE_COLUMNS = ("self_calibrated", "class_stability", "class_share", "runner_up_share", "mean_stability")


def noise_profile_features(reference_logits: torch.Tensor, reference_noisy_pred: torch.Tensor,
                           sample_logits: torch.Tensor) -> np.ndarray:
    """Per sample, the model's stability profile on its reference images (the module's five columns).

    Args:
        reference_logits: ``(M, C)`` the model's logits on the clean reference images.
        reference_noisy_pred: ``(D, M)`` its predicted classes on ``D`` noisy copies of each reference image.
        sample_logits: ``(N, C)`` its logits on the samples to describe.

    Returns:
        ``(N, 5)`` float32, columns `NOISE_PROFILE_COLUMNS`.

    Raises:
        ValueError: If the shapes disagree or there are no reference images or draws.

    Example:
        >>> reference = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 4.0]])
        >>> noisy = torch.tensor([[0, 0, 1], [0, 1, 1]])   # 2 draws: image 1 keeps class 1 once, 0 and 2 twice
        >>> features = noise_profile_features(reference, noisy, torch.tensor([[0.0, 2.0]]))
        >>> features.astype(float).round(3).tolist()   # stability 0.5 at max softmax 0.731, 1 at 0.953: 0.838 at 0.881
        [[0.838, 0.75, 0.5, 0.5, 0.833]]
    """
    from sklearn.isotonic import IsotonicRegression

    if reference_logits.ndim != 2 or sample_logits.ndim != 2 or sample_logits.shape[1] != reference_logits.shape[1]:
        raise ValueError(f"Expected `reference_logits` (M, C) and `sample_logits` (N, C) with the same C, but got "
                         f"{tuple(reference_logits.shape)} and {tuple(sample_logits.shape)}")
    if reference_noisy_pred.ndim != 2 or reference_noisy_pred.shape[1] != reference_logits.shape[0] \
            or reference_noisy_pred.numel() == 0:
        raise ValueError(f"Expected `reference_noisy_pred` of shape (draws, {reference_logits.shape[0]}) with at "
                         f"least one draw and image, but got {tuple(reference_noisy_pred.shape)}")
    num_classes = reference_logits.shape[1]
    clean_pred = reference_logits.argmax(dim=1)
    stay = (reference_noisy_pred == clean_pred.unsqueeze(0)).double().mean(dim=0)  # (M,)
    mean = stay.mean()
    counts = torch.bincount(clean_pred, minlength=num_classes).double()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, clean_pred, stay)
    class_stability = torch.where(counts > 0, sums / counts.clamp_min(1), mean)
    class_share = torch.bincount(reference_noisy_pred.flatten(), minlength=num_classes).double()
    class_share = class_share / reference_noisy_pred.numel()

    confidence = reference_logits.double().softmax(dim=1).max(dim=1).values
    fit = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0)
    fit.fit(confidence.numpy(), stay.numpy())
    probs = sample_logits.double().softmax(dim=1)
    top2 = probs.topk(min(2, num_classes), dim=1)
    first = top2.indices[:, 0]
    second = top2.indices[:, -1]
    columns = [torch.as_tensor(fit.predict(top2.values[:, 0].numpy())), class_stability[first], class_share[first],
               class_share[second], mean.expand(len(sample_logits))]
    return torch.stack(columns, dim=1).float().numpy()
