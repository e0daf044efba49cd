"""The relay: WebSocket sessions, routing, acknowledgements, durable delivery.

``core`` decides (sans-I/O): it routes each event to ``sessions`` (session lifecycle),
``delivery`` (messages to their recipients) and ``receipts`` (the sender's side), which share a
``context`` and change the state in ``model``; its module docstring has the map and the rules.
``hub`` drives it with Trio, ``transport`` and ``listeners`` connect sockets to it, ``frames``
is the wire format and ``records`` the store's view. This package imports nothing eagerly: the
store imports ``records``, and ``hub`` imports the store.
"""
