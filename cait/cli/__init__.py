"""Every command line of the package, one module each (``python -m cait.<tool>`` keeps working):

::

    finetune   python -m cait.finetune   (cait/finetune/__main__.py)
    compress   python -m cait.compress   (cait/compress/__main__.py)
    bench      python -m cait.bench      (cait/bench.py)
    export     python -m cait.export     (cait/export.py)
"""
