"""Adapters that plug the EMA into training frameworks: one module per framework
(``ema_cuda.integrations.lightning``, ...), each importing its framework only
when it is itself imported, so that ``import ema_cuda`` never needs one and a
framework that is missing only makes its own module unusable."""
