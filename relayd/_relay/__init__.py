"""The relay: WebSocket sessions, routing, acknowledgements, durable delivery.

``core`` decides (sans-I/O), ``hub`` drives it with Trio, ``transport`` and ``listeners``
connect sockets to it, ``frames`` is the wire format and ``records`` the store's view. This
package imports nothing eagerly: the store imports ``records``, and ``hub`` imports the store.
"""
