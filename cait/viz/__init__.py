"""Figures: image overlays (:mod:`cait.viz.overlay`) and plotly charts and pandas tables (:mod:`cait.viz.charts`)."""
