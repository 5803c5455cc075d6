"""Clinical imaging math that needs neither grpc nor pydicom: DICOM greyscale pixel transforms
(modality LUT, VOI windowing, MONOCHROME1 inversion, window stacks as channels) and the per-model
DICOM defaults a manifest declares. The pydicom / highdicom adapters live in xaiserve.service.dicom_in
and xaiserve.service.dicom_out."""
