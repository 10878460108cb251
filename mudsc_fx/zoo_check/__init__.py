"""Zoo checking: prove every model of a zoo (in parallel worker processes, each with a time
limit and a memory guard), compare the run with a baseline, and write reports CI systems read.

>>> from mudsc_fx.sources import zoo
>>> from mudsc_fx.zoo_check import check_zoo
>>> results = check_zoo(zoo("torchvision", only="resnet18"), jobs=1)   # doctest: +SKIP
>>> results[0].status, results[0].coverage                              # doctest: +SKIP
('ok', 1.0)
"""
from .result import ModelResult, SpaceSignature, ZooReport, load_report, rows_equal
from .run import Limits, check_model, check_zoo

__all__ = ["Limits", "ModelResult", "SpaceSignature", "ZooReport", "check_model", "check_zoo",
           "load_report", "rows_equal"]
