"""The Redis engine: relayd's store on a Redis 7 (or Valkey) server, for many relayd nodes.

:class:`RedisStore` keeps the SQLite store's contract (:class:`relayd._store.Store`): the same
methods, arguments and results, and the same tests run on both.

Theory of operation:

* **One round trip per call, atomic.** Every method is one ``EVALSHA`` of one Lua script
  (``store.lua``), which Redis runs atomically: nothing else runs on the server meanwhile. A
  batch of :meth:`RedisStore.execute` is one call, its operations packed as MessagePack and
  applied in order, each seeing the effects of those before it: SQLite's group commit. The
  script is loaded at open; a server that lost it (restart, failover, ``SCRIPT FLUSH``)
  answers ``NOSCRIPT``, and the call loads it and repeats itself. A batch that holds a
  ``Publish`` is two: its message's id is reserved first (see *Topics*).
* **All or nothing.** Redis never rolls a script back, so the script checks everything that
  could make it fail (the batch's shape and types; an ``Insert`` whose seq holds another
  message) before its first write, and refuses the whole batch with an error reply. (A key of
  the wrong type under the prefix, written by something else, would still fail a script
  half-way; so would a bug in it.) SQLite refuses a seq that holds another message only when
  the ``Insert`` would store its row; this engine refuses it whatever the ``Insert``'s fate.
  With seqs from :meth:`RedisStore.reserve_seqs`, no two messages are given one seq.
* **Differences from SQLite**, where the contract leaves room: a family created for a client
  that was never registered, or twice, is a ``StoreError`` (SQLite: ``IntegrityError``); the
  rows a read of a batch loads are decrypted once the batch is committed, so an undecryptable
  row raises with the batch's writes kept (SQLite rolls them back); ``inline`` changes
  nothing; the seq counter remembers reservations across restarts (SQLite's, in memory, not).
  A ``Publish``'s deliveries are numbered in subscriber order, those queued first, then those
  failed at once (SQLite: in subscriber order); when a subscriber joined is not kept (nothing
  reads it); an ``Insert`` that reuses the (sender, msgid) of a topic's message is its
  ``Duplicate`` (SQLite refuses it as ``queue_full``).
* **Deadlines, and errors relayd owns.** Each call has a deadline (``call_timeout``, 5 s
  by default, connecting included); no coredis exception leaves the store:
  :class:`~relayd._errors.StoreUnavailable` when Redis cannot be reached, did not answer in
  time or cannot take the call now (``LOADING``, ``READONLY``, ``OOM``, ``BUSY``, too few
  replicas); :class:`~relayd._errors.StoreError` when it refused the call. A call whose
  deadline passed after it was sent took effect as a whole, or not at all. coredis retries
  nothing on its own (a repeated write could apply twice).
* **Seqs for many nodes.** :meth:`RedisStore.reserve_seqs` takes seqs from one counter
  (``INCRBY``): no two nodes are given the same one. An ``Insert`` raises the counter to its
  seq if it is higher, so the counter is also the highest seq ever stored.
* **Encryption at rest** as in SQLite (:mod:`relayd._atrest`): content is sealed in Python
  before it is sent, opened after it is loaded; Redis, its RDB and AOF files and its replicas
  only ever hold the ciphertext. Opening checks that the keys decrypt the first message of
  every key in use, and seals messages stored in plain text (by a store opened without keys,
  which the daemon never does); their plain text stays in the AOF until Redis rewrites it
  (``BGREWRITEAOF``) and in RDB snapshots taken before, which relayd does not force.
* **Layout migrations** happen when relayd opens the data: :meth:`RedisStore.migrate` walks
  the messages (``acc``, by rank) a page per ``EVALSHA``, so Redis is never held for long. The
  first call writes the new version (an older relayd refuses the data from then on) and a
  cursor (``schema:migration``); each call moves it atomically, the last deletes it. A node
  killed half-way leaves the cursor; the next one to open goes on from it; nodes opening at
  once share it. Nodes running an older relayd must be stopped before a newer one opens the
  data (they would go on writing the old layout). Layout 1 -> 2 splits each ``m:<seq>`` into
  its message and its delivery, and adds the delivery to the history indexes (layout 1 kept
  no conversation, nor when a message was delivered: a delivery whose status is
  ``delivered`` was delivered when it finished); every other index keeps its members. Layout
  2 -> 3 (topics) writes the version: it added keys and fields, and changed none.
* **History** (:meth:`RedisStore.history`) is read on indexes of its own: per client what it
  received (``hr``) and sent (``hs``), per sender and recipient (``hp``), and the same three
  per conversation (``hc*``), each a sorted set of seqs. A page reads at most a page past the
  cursor from each side (one index, or two for ``box="all"``) and merges them: it costs its
  size, not the history's, with or without a peer or a conversation. Every delivery is in the
  three of its sender and recipient (and three more in a conversation) from its ``Insert``
  until it is purged. Deleting a client makes its tombstone in one call and then deletes its
  history a page (``FORGET_PAGE``) per call, so that Redis, which runs nothing else during a
  call, is never held long by a big history (one call for 100,000 messages held it ~10 s); the
  clients whose history is still being deleted are in ``forget`` with a cursor, and a deletion
  cut short (the node stopped between pages) is finished by the next node that opens the
  store. A purge, likewise, looks at a page (``PURGE_PAGE``) of the oldest finished
  deliveries per call, stepping past those it keeps (a receipt still owed): the batch that
  asks for it takes the first page, further calls the rest (cut short, the next sweep goes on).
* **Topics** (the contract: ``relayd/_store_topics.py``). A ``Publish`` stores one message and
  a delivery per subscriber, in its batch's call. Its content must be sealed (in Python) for
  the message's id, which is a seq: the batch first reserves one per ``Publish`` from the seq
  counter (as :meth:`RedisStore.reserve_seqs`), kept with the ``Publish`` while it lives, so
  that a batch run again after its answer was lost finds it ("this very Publish", as an
  ``Insert`` finds itself) rather than a duplicate; the script takes the deliveries' seqs,
  whose number only it knows, from the same counter (``INCRBY``, above any seq an ``Insert``
  of the batch holds). A publish holds Redis about 25 µs per subscriber: 20-30 ms for 1,000
  subscribers, 250-300 ms for 10,000 (``contrib/bench/store_fanout.py``; SQLite's writer
  takes longer).
  A published message keeps counts of its deliveries by final status (what ``topic_counts``
  reads, whatever their number), and stays, content and all, while its topic's history
  keeps it (``ih``): a ``Finish`` or a purge never takes it then. A history is trimmed by
  count when a message is published or the topic's ``history_count`` shrinks, by age by the
  purge (a page per call, on ``tha``: each message's time of leaving, by its topic's
  ``history_age``). Deleting a topic is one call (its members: at most the server's limit).
  A deleted client's subscriptions end with its tombstone; then, in the pages of its
  deletion, its messages leave the topics' histories and the topics it owns are deleted (one
  a call), finished by the next open if cut short.
* **Durability** is the server's: with ``appendonly yes`` and ``appendfsync always``, Redis
  answers a write once it is written and fsynced to its AOF, so an answered call is on disk;
  with ``everysec``, a crash of the server's machine may lose about the last second of
  answered writes; with only RDB snapshots, everything since the last one. relayd reads the
  two settings at open (``CONFIG GET``), logs what they promise (a warning unless
  ``always``) and keeps it in :attr:`RedisStore.durability`; it does not refuse a server
  configured otherwise, since a replica (below) may be the operator's choice instead. With
  ``wait_replicas = N``, every write is followed by ``WAIT N`` on the same connection, and
  fails with ``StoreUnavailable`` unless N replicas acknowledged it within ``wait_timeout``
  (the write stays on the primary). ``WAITAOF`` (Redis 7.2+) is not used: relayd runs on
  Redis 7.0, the oldest it supports, and uses no command newer than that.

URL forms (see :mod:`relayd._redis._url`): ``redis://[[user]:password@]host[:port][/db]``,
``rediss://...`` (TLS; the server's certificate and name are checked), ``unix:///path.sock?db=N``,
``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]`` (the primary
Sentinel names, found again after a failover) and ``rediss+sentinel://...``.

Key layout. Every key starts with the prefix (``relayd:`` by default; several relayd
installations may share a server under different prefixes). ``<uuid>`` is a client's uuid,
``<seq>`` a delivery's seq, ``<id>`` a message's id; a *padded seq* (or id) is the number in 16
digits, so that members of equal score sort in seq order; times are stored as the decimal text
of a float.

A *message* is stored once; each recipient's copy of it is a *delivery*, with its own seq,
attempts and status. A direct message's id is the seq of its one delivery, so that content
sealed at rest is bound to the same :class:`~relayd._atrest.RowId` (id, sender, address, msgid)
as in layout 1, where a message and its delivery were one hash. A topic's message has an id
(a seq) of its own, its address is ``#<topic>`` (its content is sealed for that), and its
deliveries' seqs follow one another (``d0`` on). A message's content is emptied once none of its
deliveries is queued (unless history keeps it: ``Finish.keep_content``, or its topic's
history); the message goes once its last delivery is purged (and its topic's history let it
go).

=================================  =========  ==================================================
key                                type       what
=================================  =========  ==================================================
``schema``                         string     the layout's version (:data:`LAYOUT_VERSION`)
``seq``                            string     the seq counter: highest seq reserved or stored
``c:<uuid>``                       hash       a client: ``n`` name, ``h`` secret hash (empty
                                              once deleted), ``r`` roles (space-separated),
                                              ``ca`` created_at, ``tv`` tokens_valid_after,
                                              ``da`` deleted_at (a tombstone), ``kseq`` its key
                                              records' counter, ``pr`` 1 while its read
                                              receipts are off (its reads are private)
``clients``                        zset       live clients, by created_at (ties by uuid)
``f:<family>``                     hash       a refresh family: ``c`` client, ``j`` current jti,
                                              ``ca``, ``ra`` rotated_at, ``ex`` expires_at, ``rv``
                                              revoked_at, ``rr`` revoked_reason
``cf:<uuid>``                      set        the client's families
``fexp``                           zset       families by expires_at
``rt``                             zset       revoked access-token jtis by expires_at
``rtwho``                          hash       jti -> MessagePack [subject, revoked_at]
``i:<id>``                         hash       an invite: ``ca``, ``cb`` created_by, ``ex``
                                              expires_at, ``ua`` used_at, ``ub`` used_by
``invites``                        zset       invites by created_at
``invites:open``                   zset       unspent invites by expires_at
``invites:spent``                  zset       spent invites by used_at
``key:<uuid>:<n>``                 hash       a public key: ``a`` algorithm, ``k`` key bytes,
                                              ``f`` fingerprint, ``p`` published_at, ``s``
                                              superseded_at (absent while current)
``keys:<uuid>``                    zset       the client's key records (``n``, by ``n``)
``rd:<uuid>``                      zset       readers of the client's keys, by read_at
``rs:<reader>``                    set        clients whose keys ``reader`` read
``kn:<reader>``                    hash       key notices owed to ``reader``: field
                                              ``<len>:<client><algorithm>``, value MessagePack
                                              [client, algorithm, fingerprint, previous,
                                              changed_at]
``kw:<uuid>``                      hash       reader -> how many notices about the client it
                                              is owed
``m:<id>``                         hash       a message: ``s`` sender, ``i`` msgid, ``r``
                                              address (whom it was sent to: a client's uuid),
                                              ``h`` high, ``a`` acknowledge, ``f`` fields
                                              (sealed: nonce + ciphertext; emptied once every
                                              delivery is final, unless kept), ``k`` key id
                                              (absent: plain or empty), ``at`` accepted_at,
                                              ``ex`` expires_at, ``nd`` its deliveries stored,
                                              ``nq`` its deliveries queued, ``cv``
                                              conversation_id (plain text; absent: none);
                                              published to a topic: ``tp`` the topic, ``to``
                                              its offset, ``ih`` 1 while in the topic's
                                              history, ``d0`` its first delivery's seq,
                                              ``dn`` its deliveries made, ``nf`` how many of
                                              them (the last) failed at once (queue full),
                                              ``n:<status>`` its deliveries of each final
                                              status
``dl:<seq>``                       hash       a delivery, one recipient's copy of a message:
                                              ``m`` the message's id, ``s`` its sender, ``r``
                                              recipient, ``ex`` expires_at, ``n`` attempts,
                                              ``st`` status (absent while queued), ``rs``
                                              reason, ``fa`` finished_at, ``rp`` receipt
                                              pending (0/1), ``dv`` delivered_at (first
                                              delivery, or finished delivered; never
                                              overwritten), ``ra`` read_at, ``rq`` read
                                              receipt pending (0/1), ``rh`` 1: read with
                                              read receipts off (hidden from the sender)
``q:<uuid>``                       zset       the recipient's queued deliveries (seqs), by seq
``queues``                         set        recipients whose queue is not empty
``exp``                            zset       queued deliveries (padded seqs) by expires_at
``fin``                            zset       final deliveries (padded seqs) by finished_at
``rc:<uuid>``                      zset       deliveries (seqs) whose final status or read
                                              receipt their sender is owed
``rid:<uuid>``                     zset       the recipient's deliveries, ``<len>:<msgid>
                                              <padded seq>`` (lexicographic: a msgid's
                                              deliveries, newest last)
``hr:<uuid>``                      zset       history: the deliveries the client received
                                              (seqs), by seq
``hs:<uuid>``                      zset       history: the deliveries the client sent (seqs), by
                                              seq
``hp:<from>:<to>``                 zset       history: the deliveries one client sent another,
                                              by seq
``hcr:<uuid>:<conv>``              zset       as ``hr``, in one conversation (the messages'
                                              ``cv``)
``hcs:<uuid>:<conv>``              zset       as ``hs``, in one conversation
``hcp:<from>:<to>:<conv>``         zset       as ``hp``, in one conversation
``acc``                            zset       every message (padded ids) by accepted_at
``d:<uuid>``                       hash       the sender's msgid -> message id (deduplication)
``ids``                            hash       msgid -> how many stored messages carry it
``ck:<key id>``                    zset       message ids whose content is sealed with that key
``ckeys``                          set        key ids that content is sealed with
``forget``                         hash       deleted client -> where deleting its history is
                                              (``hs:<seq>`` its sent side, ``hr:<seq>`` its
                                              received side, ``tp:0`` its messages in
                                              topics' histories, ``to:0`` the topics it
                                              owns): while it is not done
``cp``                             zset       message ids whose content is plain text
``schema:migration``               hash       while the data is migrated to a new layout:
                                              ``rank`` in ``acc`` the migration has reached
``t:<topic>``                      hash       a topic: ``c`` creator, ``md`` metadata, ``ac``
                                              access, ``pb`` publish, ``pr`` presence (0/1),
                                              ``hn`` history_count, ``ha`` history_age, ``ca``
                                              created_at, ``lo`` last_offset
``topics``                         zset       every topic (score 0: in id order)
``topics:open``                    zset       the open topics (score 0)
``tm:<topic>``                     zset       its subscribers (score 0: in uuid order); live
                                              clients only
``th:<topic>``                     zset       its history: message ids by offset
``tha``                            zset       messages in a topic's history (padded ids) by
                                              when they leave it by age (accepted_at +
                                              history_age)
``ct:<uuid>``                      zset       the topics the client subscribes to (score 0)
``to:<uuid>``                      zset       the topics the client created (score 0)
``tp:<uuid>``                      zset       the client's messages in a topic's history (ids)
=================================  =========  ==================================================

Deleting a client leaves what SQLite leaves: its tombstone (``c:<uuid>`` without ``kseq``),
the deliveries still queued for it or from it and those it received whose receipt their sender
is still owed, with their messages and indexes; its families, keys, readers, notices (owed to
it, or about it), subscriptions, topics and the rest of its history go, and its messages leave
the topics' histories.

Redis Cluster is not supported: the script reaches keys it derives, which a cluster would have
to hold in one slot (a prefix with a hash tag, ``{relayd}:``, would do it; untested).
"""

from ._store import DEFAULT_PREFIX, DEFAULT_TIMEOUT, LAYOUT_VERSION, RedisStore
from ._url import RedisUrlError, parse_url

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_TIMEOUT",
    "LAYOUT_VERSION",
    "RedisStore",
    "RedisUrlError",
    "parse_url",
]
