from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MaskEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_ENCODING_UNSPECIFIED: _ClassVar[MaskEncoding]
    MASK_FLOAT32: _ClassVar[MaskEncoding]
    MASK_UINT8: _ClassVar[MaskEncoding]
    MASK_PNG: _ClassVar[MaskEncoding]

class MaskResolution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_RESOLUTION_UNSPECIFIED: _ClassVar[MaskResolution]
    MASK_AT_INPUT: _ClassVar[MaskResolution]
    MASK_AT_MODEL: _ClassVar[MaskResolution]

class DropPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DROP_POLICY_UNSPECIFIED: _ClassVar[DropPolicy]
    LATEST: _ClassVar[DropPolicy]
    ALL: _ClassVar[DropPolicy]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
    EXPIRED: _ClassVar[JobState]

class JobEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_EVENT_TYPE_UNSPECIFIED: _ClassVar[JobEventType]
    EVENT_QUEUED: _ClassVar[JobEventType]
    EVENT_STARTED: _ClassVar[JobEventType]
    EVENT_PROGRESS: _ClassVar[JobEventType]
    EVENT_SUCCEEDED: _ClassVar[JobEventType]
    EVENT_FAILED: _ClassVar[JobEventType]
    EVENT_CANCELLED: _ClassVar[JobEventType]
    EVENT_EXPIRED: _ClassVar[JobEventType]
MASK_ENCODING_UNSPECIFIED: MaskEncoding
MASK_FLOAT32: MaskEncoding
MASK_UINT8: MaskEncoding
MASK_PNG: MaskEncoding
MASK_RESOLUTION_UNSPECIFIED: MaskResolution
MASK_AT_INPUT: MaskResolution
MASK_AT_MODEL: MaskResolution
DROP_POLICY_UNSPECIFIED: DropPolicy
LATEST: DropPolicy
ALL: DropPolicy
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState
EXPIRED: JobState
JOB_EVENT_TYPE_UNSPECIFIED: JobEventType
EVENT_QUEUED: JobEventType
EVENT_STARTED: JobEventType
EVENT_PROGRESS: JobEventType
EVENT_SUCCEEDED: JobEventType
EVENT_FAILED: JobEventType
EVENT_CANCELLED: JobEventType
EVENT_EXPIRED: JobEventType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor", "content_type", "dicom")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    DICOM_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    content_type: str
    dicom: DicomOptions
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., content_type: _Optional[str] = ..., dicom: _Optional[_Union[DicomOptions, _Mapping]] = ...) -> None: ...

class DicomOptions(_message.Message):
    __slots__ = ("frame", "window_center", "window_width", "all_frames")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    WINDOW_CENTER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ALL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    frame: int
    window_center: float
    window_width: float
    all_frames: bool
    def __init__(self, frame: _Optional[int] = ..., window_center: _Optional[float] = ..., window_width: _Optional[float] = ..., all_frames: bool = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "inference_ms", "total_ms", "batch_size", "inference_share_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SHARE_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    inference_ms: float
    total_ms: float
    batch_size: int
    inference_share_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., inference_share_ms: _Optional[float] = ...) -> None: ...

class MaskGeometry(_message.Message):
    __slots__ = ("height", "width", "input_height", "input_width", "content_top", "content_left", "content_height", "content_width")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TOP_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LEFT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    input_height: int
    input_width: int
    content_top: int
    content_left: int
    content_height: int
    content_width: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., content_top: _Optional[int] = ..., content_left: _Optional[int] = ..., content_height: _Optional[int] = ..., content_width: _Optional[int] = ...) -> None: ...

class ExplainOptions(_message.Message):
    __slots__ = ("method", "return_output", "fidelity", "return_png", "target_label", "output_format", "dicom_overlay", "mask_encoding", "mask_resolution")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RETURN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_FIELD_NUMBER: _ClassVar[int]
    RETURN_PNG_FIELD_NUMBER: _ClassVar[int]
    TARGET_LABEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DICOM_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    MASK_ENCODING_FIELD_NUMBER: _ClassVar[int]
    MASK_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    method: str
    return_output: bool
    fidelity: bool
    return_png: bool
    target_label: int
    output_format: str
    dicom_overlay: bool
    mask_encoding: MaskEncoding
    mask_resolution: MaskResolution
    def __init__(self, method: _Optional[str] = ..., return_output: bool = ..., fidelity: bool = ..., return_png: bool = ..., target_label: _Optional[int] = ..., output_format: _Optional[str] = ..., dicom_overlay: bool = ..., mask_encoding: _Optional[_Union[MaskEncoding, str]] = ..., mask_resolution: _Optional[_Union[MaskResolution, str]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "image", "options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: Image
    options: ExplainOptions
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., options: _Optional[_Union[ExplainOptions, _Mapping]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "mask", "output", "fidelity", "mask_png", "overlay_png", "target_label", "timing", "method", "dicom", "dicom_overlay", "mask_geometry", "target_probability", "target_absent")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    TARGET_LABEL_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DICOM_FIELD_NUMBER: _ClassVar[int]
    DICOM_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    MASK_GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TARGET_ABSENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    mask: Tensor
    output: Tensor
    fidelity: float
    mask_png: bytes
    overlay_png: bytes
    target_label: int
    timing: Timing
    method: str
    dicom: bytes
    dicom_overlay: bytes
    mask_geometry: MaskGeometry
    target_probability: float
    target_absent: bool
    def __init__(self, model: _Optional[str] = ..., mask: _Optional[_Union[Tensor, _Mapping]] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., fidelity: _Optional[float] = ..., mask_png: _Optional[bytes] = ..., overlay_png: _Optional[bytes] = ..., target_label: _Optional[int] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., method: _Optional[str] = ..., dicom: _Optional[bytes] = ..., dicom_overlay: _Optional[bytes] = ..., mask_geometry: _Optional[_Union[MaskGeometry, _Mapping]] = ..., target_probability: _Optional[float] = ..., target_absent: bool = ...) -> None: ...

class ExplainFrame(_message.Message):
    __slots__ = ("frame_id", "image", "model", "options", "policy", "max_queue", "client_timestamp_us", "max_consecutive_errors")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    MAX_CONSECUTIVE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    image: Image
    model: str
    options: ExplainOptions
    policy: DropPolicy
    max_queue: int
    client_timestamp_us: int
    max_consecutive_errors: int
    def __init__(self, frame_id: _Optional[int] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., model: _Optional[str] = ..., options: _Optional[_Union[ExplainOptions, _Mapping]] = ..., policy: _Optional[_Union[DropPolicy, str]] = ..., max_queue: _Optional[int] = ..., client_timestamp_us: _Optional[int] = ..., max_consecutive_errors: _Optional[int] = ...) -> None: ...

class FrameStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DrainNotice(_message.Message):
    __slots__ = ("seconds_left", "message")
    SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seconds_left: float
    message: str
    def __init__(self, seconds_left: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class ExplainFrameResult(_message.Message):
    __slots__ = ("frame_id", "result", "received_unix_us", "answered_unix_us", "dropped_total", "client_timestamp_us", "status", "answer_fps", "drain", "dicom_frame")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FPS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    DICOM_FRAME_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    result: ExplainResponse
    received_unix_us: int
    answered_unix_us: int
    dropped_total: int
    client_timestamp_us: int
    status: FrameStatus
    answer_fps: float
    drain: DrainNotice
    dicom_frame: int
    def __init__(self, frame_id: _Optional[int] = ..., result: _Optional[_Union[ExplainResponse, _Mapping]] = ..., received_unix_us: _Optional[int] = ..., answered_unix_us: _Optional[int] = ..., dropped_total: _Optional[int] = ..., client_timestamp_us: _Optional[int] = ..., status: _Optional[_Union[FrameStatus, _Mapping]] = ..., answer_fps: _Optional[float] = ..., drain: _Optional[_Union[DrainNotice, _Mapping]] = ..., dicom_frame: _Optional[int] = ...) -> None: ...

class DenoiseRequest(_message.Message):
    __slots__ = ("model", "tensor", "mrc", "return_mrc")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    MRC_FIELD_NUMBER: _ClassVar[int]
    RETURN_MRC_FIELD_NUMBER: _ClassVar[int]
    model: str
    tensor: Tensor
    mrc: bytes
    return_mrc: bool
    def __init__(self, model: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., mrc: _Optional[bytes] = ..., return_mrc: bool = ...) -> None: ...

class DenoiseResponse(_message.Message):
    __slots__ = ("model", "denoised", "mrc", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DENOISED_FIELD_NUMBER: _ClassVar[int]
    MRC_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: str
    denoised: Tensor
    mrc: bytes
    timing: Timing
    def __init__(self, model: _Optional[str] = ..., denoised: _Optional[_Union[Tensor, _Mapping]] = ..., mrc: _Optional[bytes] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class RelaxParams(_message.Message):
    __slots__ = ("num_masks", "cells", "p_keep", "masking", "noise_mean", "noise_std", "adaptive", "target_error", "threshold", "gamma", "batch_size", "two_pass", "seed", "estimator")
    NUM_MASKS_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    P_KEEP_FIELD_NUMBER: _ClassVar[int]
    MASKING_FIELD_NUMBER: _ClassVar[int]
    NOISE_MEAN_FIELD_NUMBER: _ClassVar[int]
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    TARGET_ERROR_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TWO_PASS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    num_masks: int
    cells: int
    p_keep: float
    masking: str
    noise_mean: float
    noise_std: float
    adaptive: bool
    target_error: float
    threshold: str
    gamma: float
    batch_size: int
    two_pass: bool
    seed: int
    estimator: str
    def __init__(self, num_masks: _Optional[int] = ..., cells: _Optional[int] = ..., p_keep: _Optional[float] = ..., masking: _Optional[str] = ..., noise_mean: _Optional[float] = ..., noise_std: _Optional[float] = ..., adaptive: bool = ..., target_error: _Optional[float] = ..., threshold: _Optional[str] = ..., gamma: _Optional[float] = ..., batch_size: _Optional[int] = ..., two_pass: bool = ..., seed: _Optional[int] = ..., estimator: _Optional[str] = ...) -> None: ...

class AblationParams(_message.Message):
    __slots__ = ("score", "num_slices", "mask_size", "sigma_regu", "saturation", "ramp_saturation", "max_iterations", "step_size", "target_label", "reduction", "window", "return_images", "baseline", "stop_saturation", "seed", "min_iterations")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    NUM_SLICES_FIELD_NUMBER: _ClassVar[int]
    MASK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIGMA_REGU_FIELD_NUMBER: _ClassVar[int]
    SATURATION_FIELD_NUMBER: _ClassVar[int]
    RAMP_SATURATION_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LABEL_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    RETURN_IMAGES_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    STOP_SATURATION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MIN_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    score: str
    num_slices: int
    mask_size: int
    sigma_regu: float
    saturation: float
    ramp_saturation: bool
    max_iterations: int
    step_size: float
    target_label: int
    reduction: str
    window: int
    return_images: bool
    baseline: Image
    stop_saturation: float
    seed: int
    min_iterations: int
    def __init__(self, score: _Optional[str] = ..., num_slices: _Optional[int] = ..., mask_size: _Optional[int] = ..., sigma_regu: _Optional[float] = ..., saturation: _Optional[float] = ..., ramp_saturation: bool = ..., max_iterations: _Optional[int] = ..., step_size: _Optional[float] = ..., target_label: _Optional[int] = ..., reduction: _Optional[str] = ..., window: _Optional[int] = ..., return_images: bool = ..., baseline: _Optional[_Union[Image, _Mapping]] = ..., stop_saturation: _Optional[float] = ..., seed: _Optional[int] = ..., min_iterations: _Optional[int] = ...) -> None: ...

class SiftParams(_message.Message):
    __slots__ = ("eta", "contrast_threshold", "edge_threshold", "sparsity", "layers_per_octave", "hard_cells", "target_label", "return_images", "sigma_lp", "sigma_hp", "score", "num_slices", "saturation", "ramp_saturation", "max_iterations", "step_size", "stop_saturation", "reduction", "metric_weights", "num_masks", "p_keep", "batch_size", "seed")
    ETA_FIELD_NUMBER: _ClassVar[int]
    CONTRAST_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EDGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    LAYERS_PER_OCTAVE_FIELD_NUMBER: _ClassVar[int]
    HARD_CELLS_FIELD_NUMBER: _ClassVar[int]
    TARGET_LABEL_FIELD_NUMBER: _ClassVar[int]
    RETURN_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SIGMA_LP_FIELD_NUMBER: _ClassVar[int]
    SIGMA_HP_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    NUM_SLICES_FIELD_NUMBER: _ClassVar[int]
    SATURATION_FIELD_NUMBER: _ClassVar[int]
    RAMP_SATURATION_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    STOP_SATURATION_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    METRIC_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    NUM_MASKS_FIELD_NUMBER: _ClassVar[int]
    P_KEEP_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    eta: float
    contrast_threshold: float
    edge_threshold: float
    sparsity: float
    layers_per_octave: int
    hard_cells: bool
    target_label: int
    return_images: bool
    sigma_lp: float
    sigma_hp: float
    score: str
    num_slices: int
    saturation: float
    ramp_saturation: bool
    max_iterations: int
    step_size: float
    stop_saturation: float
    reduction: str
    metric_weights: bool
    num_masks: int
    p_keep: float
    batch_size: int
    seed: int
    def __init__(self, eta: _Optional[float] = ..., contrast_threshold: _Optional[float] = ..., edge_threshold: _Optional[float] = ..., sparsity: _Optional[float] = ..., layers_per_octave: _Optional[int] = ..., hard_cells: bool = ..., target_label: _Optional[int] = ..., return_images: bool = ..., sigma_lp: _Optional[float] = ..., sigma_hp: _Optional[float] = ..., score: _Optional[str] = ..., num_slices: _Optional[int] = ..., saturation: _Optional[float] = ..., ramp_saturation: bool = ..., max_iterations: _Optional[int] = ..., step_size: _Optional[float] = ..., stop_saturation: _Optional[float] = ..., reduction: _Optional[str] = ..., metric_weights: bool = ..., num_masks: _Optional[int] = ..., p_keep: _Optional[float] = ..., batch_size: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("method", "model", "image", "relax", "ablation", "sift", "idempotency_key", "priority", "deadline_seconds", "output_format", "dicom_overlay")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    RELAX_FIELD_NUMBER: _ClassVar[int]
    ABLATION_FIELD_NUMBER: _ClassVar[int]
    SIFT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DICOM_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    method: str
    model: str
    image: Image
    relax: RelaxParams
    ablation: AblationParams
    sift: SiftParams
    idempotency_key: str
    priority: int
    deadline_seconds: float
    output_format: str
    dicom_overlay: bool
    def __init__(self, method: _Optional[str] = ..., model: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., relax: _Optional[_Union[RelaxParams, _Mapping]] = ..., ablation: _Optional[_Union[AblationParams, _Mapping]] = ..., sift: _Optional[_Union[SiftParams, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., priority: _Optional[int] = ..., deadline_seconds: _Optional[float] = ..., output_format: _Optional[str] = ..., dicom_overlay: bool = ...) -> None: ...

class RelaxResult(_message.Message):
    __slots__ = ("importance", "uncertainty", "u_relax", "threshold", "num_masks", "achieved_error", "png", "masks_per_second")
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    U_RELAX_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NUM_MASKS_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_ERROR_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    MASKS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    importance: Tensor
    uncertainty: Tensor
    u_relax: Tensor
    threshold: float
    num_masks: int
    achieved_error: float
    png: bytes
    masks_per_second: float
    def __init__(self, importance: _Optional[_Union[Tensor, _Mapping]] = ..., uncertainty: _Optional[_Union[Tensor, _Mapping]] = ..., u_relax: _Optional[_Union[Tensor, _Mapping]] = ..., threshold: _Optional[float] = ..., num_masks: _Optional[int] = ..., achieved_error: _Optional[float] = ..., png: _Optional[bytes] = ..., masks_per_second: _Optional[float] = ...) -> None: ...

class AblationResult(_message.Message):
    __slots__ = ("path", "times", "probabilities", "heatmap", "score_history", "saturation_history", "stop_reason", "target_label", "score", "baseline_sigma", "images", "strip_png", "heatmap_png", "iterations", "path_down")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    SCORE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    SATURATION_HISTORY_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    TARGET_LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_SIGMA_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STRIP_PNG_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    PATH_DOWN_FIELD_NUMBER: _ClassVar[int]
    path: Tensor
    times: Tensor
    probabilities: Tensor
    heatmap: Tensor
    score_history: _containers.RepeatedScalarFieldContainer[float]
    saturation_history: _containers.RepeatedScalarFieldContainer[float]
    stop_reason: str
    target_label: int
    score: float
    baseline_sigma: float
    images: Tensor
    strip_png: bytes
    heatmap_png: bytes
    iterations: int
    path_down: Tensor
    def __init__(self, path: _Optional[_Union[Tensor, _Mapping]] = ..., times: _Optional[_Union[Tensor, _Mapping]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., heatmap: _Optional[_Union[Tensor, _Mapping]] = ..., score_history: _Optional[_Iterable[float]] = ..., saturation_history: _Optional[_Iterable[float]] = ..., stop_reason: _Optional[str] = ..., target_label: _Optional[int] = ..., score: _Optional[float] = ..., baseline_sigma: _Optional[float] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., strip_png: _Optional[bytes] = ..., heatmap_png: _Optional[bytes] = ..., iterations: _Optional[int] = ..., path_down: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SiftKeypoint(_message.Message):
    __slots__ = ("row", "col", "sigma")
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    row: float
    col: float
    sigma: float
    def __init__(self, row: _Optional[float] = ..., col: _Optional[float] = ..., sigma: _Optional[float] = ...) -> None: ...

class SiftResult(_message.Message):
    __slots__ = ("keypoints", "gains", "times", "probabilities", "target_probability", "keypoint_scores", "importance", "uncertainty", "std_error", "heatmap_voronoi", "heatmap_bandpass", "images", "strip_png", "heatmap_png", "score_history", "saturation_history", "stop_reason", "iterations", "target_label", "score", "num_masks", "reconstruction_error", "gains_down", "metric_weights")
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    GAINS_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    KEYPOINT_SCORES_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    STD_ERROR_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_VORONOI_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_BANDPASS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STRIP_PNG_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    SCORE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    SATURATION_HISTORY_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    TARGET_LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    NUM_MASKS_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_ERROR_FIELD_NUMBER: _ClassVar[int]
    GAINS_DOWN_FIELD_NUMBER: _ClassVar[int]
    METRIC_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    keypoints: _containers.RepeatedCompositeFieldContainer[SiftKeypoint]
    gains: Tensor
    times: Tensor
    probabilities: Tensor
    target_probability: _containers.RepeatedScalarFieldContainer[float]
    keypoint_scores: Tensor
    importance: Tensor
    uncertainty: Tensor
    std_error: Tensor
    heatmap_voronoi: Tensor
    heatmap_bandpass: Tensor
    images: Tensor
    strip_png: bytes
    heatmap_png: bytes
    score_history: _containers.RepeatedScalarFieldContainer[float]
    saturation_history: _containers.RepeatedScalarFieldContainer[float]
    stop_reason: str
    iterations: int
    target_label: int
    score: float
    num_masks: int
    reconstruction_error: float
    gains_down: Tensor
    metric_weights: Tensor
    def __init__(self, keypoints: _Optional[_Iterable[_Union[SiftKeypoint, _Mapping]]] = ..., gains: _Optional[_Union[Tensor, _Mapping]] = ..., times: _Optional[_Union[Tensor, _Mapping]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., target_probability: _Optional[_Iterable[float]] = ..., keypoint_scores: _Optional[_Union[Tensor, _Mapping]] = ..., importance: _Optional[_Union[Tensor, _Mapping]] = ..., uncertainty: _Optional[_Union[Tensor, _Mapping]] = ..., std_error: _Optional[_Union[Tensor, _Mapping]] = ..., heatmap_voronoi: _Optional[_Union[Tensor, _Mapping]] = ..., heatmap_bandpass: _Optional[_Union[Tensor, _Mapping]] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., strip_png: _Optional[bytes] = ..., heatmap_png: _Optional[bytes] = ..., score_history: _Optional[_Iterable[float]] = ..., saturation_history: _Optional[_Iterable[float]] = ..., stop_reason: _Optional[str] = ..., iterations: _Optional[int] = ..., target_label: _Optional[int] = ..., score: _Optional[float] = ..., num_masks: _Optional[int] = ..., reconstruction_error: _Optional[float] = ..., gains_down: _Optional[_Union[Tensor, _Mapping]] = ..., metric_weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("relax", "ablation", "sift", "timings", "parameters_json", "dicom", "dicom_overlay")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RELAX_FIELD_NUMBER: _ClassVar[int]
    ABLATION_FIELD_NUMBER: _ClassVar[int]
    SIFT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    DICOM_FIELD_NUMBER: _ClassVar[int]
    DICOM_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    relax: RelaxResult
    ablation: AblationResult
    sift: SiftResult
    timings: _containers.ScalarMap[str, float]
    parameters_json: str
    dicom: bytes
    dicom_overlay: bytes
    def __init__(self, relax: _Optional[_Union[RelaxResult, _Mapping]] = ..., ablation: _Optional[_Union[AblationResult, _Mapping]] = ..., sift: _Optional[_Union[SiftResult, _Mapping]] = ..., timings: _Optional[_Mapping[str, float]] = ..., parameters_json: _Optional[str] = ..., dicom: _Optional[bytes] = ..., dicom_overlay: _Optional[bytes] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "method", "model", "state", "progress", "error", "created_unix", "started_unix", "finished_unix", "result", "idempotency_key", "priority", "attempts", "queue_position", "owner")
    ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    id: str
    method: str
    model: str
    state: JobState
    progress: float
    error: str
    created_unix: float
    started_unix: float
    finished_unix: float
    result: JobResult
    idempotency_key: str
    priority: int
    attempts: int
    queue_position: int
    owner: str
    def __init__(self, id: _Optional[str] = ..., method: _Optional[str] = ..., model: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[float] = ..., error: _Optional[str] = ..., created_unix: _Optional[float] = ..., started_unix: _Optional[float] = ..., finished_unix: _Optional[float] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., priority: _Optional[int] = ..., attempts: _Optional[int] = ..., queue_position: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("id", "include_result")
    ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RESULT_FIELD_NUMBER: _ClassVar[int]
    id: str
    include_result: bool
    def __init__(self, id: _Optional[str] = ..., include_result: bool = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "type", "progress", "partial_heatmap", "score", "metrics", "message", "unix_time", "job", "sequence")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_HEATMAP_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    type: JobEventType
    progress: float
    partial_heatmap: Tensor
    score: float
    metrics: _containers.ScalarMap[str, float]
    message: str
    unix_time: float
    job: Job
    sequence: int
    def __init__(self, job_id: _Optional[str] = ..., type: _Optional[_Union[JobEventType, str]] = ..., progress: _Optional[float] = ..., partial_heatmap: _Optional[_Union[Tensor, _Mapping]] = ..., score: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., message: _Optional[str] = ..., unix_time: _Optional[float] = ..., job: _Optional[_Union[Job, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    def __init__(self, kind: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("height", "width", "channels", "mean", "std", "resize")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    resize: str
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., resize: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "kind", "input", "labels", "explains", "description", "methods", "loaded", "card", "output_dim", "available", "unavailable_reason", "default_method")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EXPLAINS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_METHOD_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    kind: str
    input: InputSpec
    labels: _containers.RepeatedScalarFieldContainer[str]
    explains: str
    description: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    loaded: bool
    card: str
    output_dim: int
    available: bool
    unavailable_reason: str
    default_method: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., explains: _Optional[str] = ..., description: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., loaded: bool = ..., card: _Optional[str] = ..., output_dim: _Optional[int] = ..., available: bool = ..., unavailable_reason: _Optional[str] = ..., default_method: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
