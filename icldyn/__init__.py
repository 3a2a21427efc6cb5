"""icldyn: training dynamics of in-context-learning circuits, as grids compiled into one program.

Data flows one way: config → grid → data → model (+clamps) → train (vmap runs ·
scan steps · shard) → checkpoints + metrics → analysis → plots. Importing the
package imports nothing heavy (plots must stay free of JAX).
"""

__version__ = "0.1.0"
