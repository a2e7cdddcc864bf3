"""Data: the synthetic shapes (with per-pixel masks), bundled photos, training sets with step-indexed batches, and
unlabelled calibration images.

::

    synthetic    SyntheticShapes: 8 shape classes on clutter, a pure function of (seed, split, index)
    photos       real photos from installed packages; image validation for uploads
    errors       DataError, which every reader raises
    hub          Hugging Face datasets as data: hf:NAME[:CONFIG][@SPLIT], offline from the HF cache
    datasets     build_datasets ("synthetic", "photos", an ImageFolder, hf:...), StepBatchSampler, Unlabelled
    calibration  calibration_images: named sources, a folder, hf:..., a tensor or a DataLoader
    segmentation per-pixel class maps: synthetic shapes at any resolution, a checked images/ + masks/ folder
"""
