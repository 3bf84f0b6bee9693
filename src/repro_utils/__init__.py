"""repro_utils: the small shared package of the course "Trust, but reproduce".

Modules, one job each: claims (what a chapter declares), grading (the ladder and the interval rule),
profiles (profiles and parameters), run (what a notebook calls), ledger (results JSON, one per device),
records (regrade, export, import), data (corpora and tokens), bench (timing), check / scoreboard /
execute / cli (the ``repro`` command).
"""

from repro_utils.grading import Grade, Measurement, grade
from repro_utils.profiles import ParameterError
from repro_utils.run import Clock, Run, start

__all__ = ["Clock", "Grade", "Measurement", "ParameterError", "Run", "grade", "start"]
__version__ = "0.1.0"
