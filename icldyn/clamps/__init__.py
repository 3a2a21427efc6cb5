"""Clamps: the catalogue of interventions, their plans and their config forms.

`catalogue` owns the typed constructors (each beside the traced half that
applies it), `plan` turns per-run lists of them into one compiled plan plus
per-run arrays, `custom` makes a user's Python function a clamp, and `forms` parses the config text and the named evaluation
clamps. The mechanism underneath (`Clamp(value, mask)`, `apply_clamp`) is
the model's (`icldyn.model`). docs/clamps.md is the user's guide.
"""

from icldyn.clamps.catalogue import CATALOGUE as CATALOGUE
from icldyn.clamps.catalogue import PRESERVABLE as PRESERVABLE
from icldyn.clamps.catalogue import AblateHeads as AblateHeads
from icldyn.clamps.catalogue import ClampSpec as ClampSpec
from icldyn.clamps.catalogue import CopyFromHead as CopyFromHead
from icldyn.clamps.catalogue import DisallowPrevToken as DisallowPrevToken
from icldyn.clamps.catalogue import GraftIn as GraftIn
from icldyn.clamps.catalogue import GraftOut as GraftOut
from icldyn.clamps.catalogue import HeadTemperature as HeadTemperature
from icldyn.clamps.catalogue import InductionPattern as InductionPattern
from icldyn.clamps.catalogue import Layer1Clamp as Layer1Clamp
from icldyn.clamps.catalogue import MatchPattern as MatchPattern
from icldyn.clamps.catalogue import Preserve as Preserve
from icldyn.clamps.catalogue import PrevTokenPattern as PrevTokenPattern
from icldyn.clamps.catalogue import SilenceNonLabel as SilenceNonLabel
from icldyn.clamps.catalogue import copy_logits as copy_logits
from icldyn.clamps.custom import CustomClamp as CustomClamp
from icldyn.clamps.custom import custom_clamp as custom_clamp
from icldyn.clamps.forms import CONDITIONS as CONDITIONS
from icldyn.clamps.forms import condition_clamps as condition_clamps
from icldyn.clamps.forms import describe as describe
from icldyn.clamps.forms import eval_clamp_names as eval_clamp_names
from icldyn.clamps.forms import keep_head_clamps as keep_head_clamps
from icldyn.clamps.forms import named_clamps as named_clamps
from icldyn.clamps.forms import named_plan as named_plan
from icldyn.clamps.forms import parse as parse
from icldyn.clamps.forms import plans_for_group as plans_for_group
from icldyn.clamps.forms import render as render
from icldyn.clamps.forms import run_clamps as run_clamps
from icldyn.clamps.forms import validate as validate
from icldyn.clamps.plan import Plan as Plan
from icldyn.clamps.plan import build as build
from icldyn.clamps.plan import check_conflicts as check_conflicts
from icldyn.clamps.plan import fixed_plan as fixed_plan
from icldyn.clamps.plan import resolve as resolve
from icldyn.model import Clamp as Clamp
from icldyn.model import apply_clamp as apply_clamp
from icldyn.model import conflicts as conflicts
from icldyn.model import is_clamp as is_clamp
from icldyn.model import merge as merge
