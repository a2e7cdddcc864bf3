"""The app's engine: everything ``app.py`` shows, as plain Python (PIL images, plotly figures, pandas tables), so it
is testable without a browser; the Gradio widgets are :mod:`cait.studio.ui`, one file per tab.

::

    catalogue   ModelRef: a DeiT, the bundled pair or a finished job; the Model dropdown's choices
    pairs       ModelPair and the PairCache that builds (original, twin) once per setting
    samples     photos, held-out synthetic samples (with masks), uploads
    attention   the Attention tab's answer        channels   the Channels tab's answer
    cost        the Cost tab's answer             download   the twin's checkpoint as a .zip
    segmentation  the Segmentation tab's answers: bundled segmenters, masks, per-class IoU, cost
    status      every status line's wording       public     public-mode limits and upload checks
    engine      Studio: the object the UI holds (device, limits, catalogue, pairs, jobs)
    jobs/       background fine-tune jobs: model, store, validate, process, retention, manager, views
    ui/         the Gradio page
"""
