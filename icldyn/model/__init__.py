"""The model: the transformer core every task shares, and the clamp mechanism.

`core` owns the Flax model (blocks, final norm, unembedding; a task's
`FrontEnd` supplies the embedding and the read-out); `clamp` owns
`Clamp(value, mask)` and how it is applied; `cache` the activations by flat
name (`Cache`). Neither knows any task or the
clamp catalogue (`icldyn.clamps`), which build on them.
"""

from icldyn.model.cache import Cache as Cache
from icldyn.model.cache import act_name as act_name
from icldyn.model.clamp import Clamp as Clamp
from icldyn.model.clamp import apply_clamp as apply_clamp
from icldyn.model.clamp import conflicts as conflicts
from icldyn.model.clamp import is_clamp as is_clamp
from icldyn.model.clamp import merge as merge
from icldyn.model.core import Embed as Embed
from icldyn.model.core import FrontEnd as FrontEnd
from icldyn.model.core import ModelSpec as ModelSpec
from icldyn.model.core import Transformer as Transformer
from icldyn.model.core import apply as apply
from icldyn.model.core import init_params as init_params
from icldyn.model.core import per_output_init as per_output_init
from icldyn.model.core import take_rows as take_rows
