"""The one table of model kinds and explanation methods.

Everything that needs to know which method applies to which model reads this module: ListModels
(what it advertises), the fast path (what Explain accepts), job submission (what SubmitJob accepts),
the job workers (which class implements a job method), the CLI and the evaluation. A method declares

- the RPC that serves it (Explain, SubmitJob or Denoise),
- the model kinds it explains,
- the model forms it can run on (any one suffices): "onnx" (a forward-only ONNX graph) or "torch"
  (a torch module, needed for gradients),
- whether it runs the requested model itself (`own`: a masking network's graph, the denoiser) or the
  frozen model the request names: the model itself for encoders and classifiers, and the model a
  masking network explains when a masking network is named (a gradient method asked of scenes-nemu
  explains scenes-simclr, as RELAX does),
- its parameters message (protobuf name, a string: this module imports no protobuf) and the
  implementation ("module:attr").

Adding a method is one implementation module plus one entry in METHODS; adding a model kind is one
entry in KINDS. This module imports nothing heavy (no torch, grpc or protobuf).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

FORMS = ("onnx", "torch")
RPCS = ("Explain", "SubmitJob", "Denoise")


@dataclass(frozen=True)
class KindSpec:
    """A model kind: what its ONNX graph takes and returns (batch axis dynamic everywhere)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    masking: bool = False  # a masking network: Explain with no method runs its own graph
    explains: tuple[str, ...] = ()  # kinds of frozen model a masking network may explain
    doc: str = ""


KINDS: dict[str, KindSpec] = {
    k.name: k
    for k in (
        KindSpec(
            "nem_u",
            ("image",),
            ("mask", "output"),
            masking=True,
            explains=("encoder",),
            doc="NEM-U masking network [NEM-U]: image[B,C,H,W] -> mask[B,1,H,W], output[B,D] of the frozen encoder",
        ),
        KindSpec(
            "nemt",
            ("image", "target"),
            ("mask", "output", "label"),
            masking=True,
            explains=("classifier",),
            doc="NEMt masking network [NEMt]: image, target[B] int64 (-1 = argmax) -> mask, logits, label[B]",
        ),
        KindSpec("encoder", ("image",), ("output",), doc="representation model: image -> output[B,D]"),
        KindSpec("classifier", ("image",), ("output",), doc="classifier: image -> logits[B,K]"),
        KindSpec(
            "denoiser",
            ("particles",),
            ("denoised",),
            doc="Cryo-EM denoiser [THESIS] ch. 7: particles[B,1,H,W] -> denoised[B,1,H,W], raw units",
        ),
    )
}
MASK_KINDS = tuple(k for k, s in KINDS.items() if s.masking)
FROZEN_KINDS = ("encoder", "classifier")


@dataclass(frozen=True)
class MethodSpec:
    """One explanation method (or the denoiser): where it is served and what it needs."""

    name: str  # the wire name: ExplainOptions.method / JobRequest.method
    rpc: str
    kinds: frozenset[str]
    forms: frozenset[str]  # model forms it runs on; any one suffices
    own: bool = False  # runs the requested model itself, not the frozen model it explains
    params: str = ""  # protobuf message of its parameters ("" = none)
    impl: str = ""  # "module:attr" of the implementation
    doc: str = ""
    targeted: bool = field(default=False)  # takes a target label (classifiers)

    def __post_init__(self) -> None:
        assert self.rpc in RPCS, self.rpc
        assert self.forms <= set(FORMS), self.forms
        assert self.kinds <= set(KINDS), self.kinds


def _gradient(name: str, doc: str, kinds: Iterable[str] = FROZEN_KINDS) -> MethodSpec:
    return MethodSpec(
        name,
        "Explain",
        frozenset(kinds),
        frozenset({"torch"}),
        impl="xaiserve.handlers.saliency:attribute",
        doc=doc,
        targeted=True,
    )


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "nem_u",
            "Explain",
            frozenset({"nem_u"}),
            frozenset({"onnx"}),
            own=True,
            doc="the NEM-U network's mask, one forward pass [NEM-U] sec. 3.3",
        ),
        MethodSpec(
            "nemt",
            "Explain",
            frozenset({"nemt"}),
            frozenset({"onnx"}),
            own=True,
            targeted=True,
            doc="the NEMt network's mask for a target label [NEMt] eq. 2",
        ),
        _gradient("saliency", "gradient of the representation [RELAX] eq. 14 / of the target logit"),
        _gradient("guided_backprop", "guided backpropagation [RELAX] eq. 15"),
        _gradient("smoothgrad", "SmoothGrad [RELAX] eq. 16"),
        _gradient(
            "integrated_gradients", "Integrated Gradients from the dataset mean (captum), label-free for encoders"
        ),
        _gradient("gradient_shap", "GradientShap (captum), label-free for encoders"),
        _gradient("gradcam", "Grad-CAM on the last convolution (captum LayerGradCam)"),
        _gradient("label_free_saliency", "label-free Saliency of <f(x), f(x0)> [NEM-U] sec. 4.2", kinds=("encoder",)),
        MethodSpec(
            "relax",
            "SubmitJob",
            frozenset({"encoder"}),
            frozenset({"onnx", "torch"}),
            params="RelaxParams",
            impl="xaiserve.service.jobs.relax:RelaxJobMethod",
            doc="RELAX importance, uncertainty and U-RELAX [RELAX] eq. 1-13",
        ),
        MethodSpec(
            "ablation_path",
            "SubmitJob",
            frozenset({"classifier"}),
            frozenset({"torch"}),
            params="AblationParams",
            impl="xaiserve.service.jobs.ablation:AblationJobMethod",
            targeted=True,
            doc="optimised ablation path [THESIS] ch. 2",
        ),
        MethodSpec(
            "sift_ablation",
            "SubmitJob",
            frozenset({"classifier"}),
            frozenset({"torch"}),
            params="SiftParams",
            impl="xaiserve.service.jobs.sift:SiftAblationJobMethod",
            targeted=True,
            doc="ablation path over SIFT keypoint gains [THESIS] ch. 4 (eq. 4.44)",
        ),
        MethodSpec(
            "sift_rise",
            "SubmitJob",
            frozenset({"encoder", "classifier"}),
            frozenset({"onnx", "torch"}),
            params="SiftParams",
            impl="xaiserve.service.jobs.sift:SiftRiseJobMethod",
            doc="random on/off SIFT keypoint gains with RELAX's estimator (beyond [THESIS] ch. 4, sec. 4.4)",
        ),
        MethodSpec(
            "denoise",
            "Denoise",
            frozenset({"denoiser"}),
            frozenset({"onnx"}),
            own=True,
            doc="Cryo-EM particle denoising [THESIS] ch. 7",
        ),
    )
}

GRADIENT_METHODS = tuple(n for n, m in METHODS.items() if m.impl == "xaiserve.handlers.saliency:attribute")
JOB_METHODS = tuple(n for n, m in METHODS.items() if m.rpc == "SubmitJob")


def explain_methods() -> tuple[str, ...]:
    """Every method Explain serves (its options.method values; "" means the masking network itself)."""
    return tuple(n for n, m in METHODS.items() if m.rpc == "Explain")


def applies(
    spec: MethodSpec,
    kind: str,
    forms: Iterable[str],
    frozen_kind: str | None = None,
    frozen_forms: Iterable[str] | None = None,
) -> bool:
    """Whether `spec` can run on a model of `kind` with `forms`; for methods that explain the frozen
    model, `frozen_kind`/`frozen_forms` describe it (the model itself when it is not a masking network)."""
    if spec.own:
        return kind in spec.kinds and bool(spec.forms & set(forms))
    if frozen_kind is None:
        frozen_kind, frozen_forms = kind, forms
    return frozen_kind in spec.kinds and bool(spec.forms & set(frozen_forms or ()))


def supported_methods(
    kind: str,
    forms: Iterable[str],
    frozen_kind: str | None = None,
    frozen_forms: Iterable[str] | None = None,
    rpcs: Sequence[str] = RPCS,
    job_methods: Iterable[str] | None = None,
) -> list[str]:
    """The methods a model supports, in table order. `job_methods`: the job methods this server runs
    (None = all of the table's); a method that needs a job service the server lacks is not advertised."""
    forms = frozenset(forms)
    frozen_forms = forms if frozen_forms is None else frozenset(frozen_forms)
    jobs = set(JOB_METHODS if job_methods is None else job_methods)
    out = []
    for name, spec in METHODS.items():
        if spec.rpc not in rpcs or (spec.rpc == "SubmitJob" and name not in jobs):
            continue
        if applies(spec, kind, forms, frozen_kind, frozen_forms):
            out.append(name)
    return out


def why_not(
    spec: MethodSpec,
    model_id: str,
    kind: str,
    forms: Iterable[str],
    frozen_id: str,
    frozen_kind: str,
    frozen_forms: Iterable[str],
) -> str:
    """A message saying why `spec` does not apply to the model, and what would make it apply."""
    if spec.own:
        target_id, target_kind, target_forms = model_id, kind, set(forms)
    else:
        target_id, target_kind, target_forms = frozen_id, frozen_kind, set(frozen_forms)
    via = "" if target_id == model_id else f" (which {model_id} explains)"
    if target_kind not in spec.kinds:
        return (
            f"method {spec.name!r} explains {_a(' or '.join(sorted(spec.kinds)))}, but {target_id}{via} is "
            f"{_a(target_kind)}"
        )
    need = " or ".join(sorted(spec.forms))
    have = ", ".join(sorted(target_forms)) or "none"
    return f"method {spec.name!r} needs the {need} form of {target_id}{via}, and the store has only: {have}; " + (
        "add the model's torch form (TorchScript, torch.export .pt2, or a state dict) to its store entry"
        if "torch" in spec.forms and "onnx" not in spec.forms
        else "add its ONNX graph to its store entry"
    )


def _a(noun: str) -> str:
    """The noun with its indefinite article ("an encoder", "a classifier")."""
    return ("an " if noun[:1] in "aeiou" else "a ") + noun
