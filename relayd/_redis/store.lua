-- relayd's Redis engine: every operation of the store, one EVALSHA each (relayd/_redis).
--
-- ARGV[1] is the key prefix, ARGV[2] the operation's name, ARGV[3] its arguments as one
-- MessagePack array. Conventions (relayd/_redis/__init__.py has the key layout):
--
-- * Times are decimal strings, written as Python's repr() made them and compared with
--   tonumber(): Lua's tostring() keeps 14 digits, so a number is never written back.
-- * An absent value (Python's None) arrives as false, and is returned as false (a nil reply).
-- * Strings are ordered bytewise by lt(), never with '<': Lua compares strings with strcoll(),
--   and Redis sets LC_COLLATE from its environment.
-- * An operation refuses bad input with an error reply *before its first write*: Redis does
--   not roll a script back, so a batch is all or nothing only if it cannot fail half-way.

local P = ARGV[1]
local call = redis.call
local mp_pack, mp_unpack = cmsgpack.pack, cmsgpack.unpack

local K = {}  -- key names
local U = {}  -- helpers
local OPS = {}  -- operation name -> function(args)

-- --- keys -------------------------------------------------------------------------------------

function K.client(uuid) return P .. 'c:' .. uuid end
function K.families_of(uuid) return P .. 'cf:' .. uuid end
function K.family(id) return P .. 'f:' .. id end
function K.invite(id) return P .. 'i:' .. id end
function K.message(id) return P .. 'm:' .. string.format('%d', id) end
function K.delivery(seq) return P .. 'dl:' .. string.format('%d', seq) end
function K.queue(recipient) return P .. 'q:' .. recipient end
function K.receipts(sender) return P .. 'rc:' .. sender end
function K.sent(sender) return P .. 'd:' .. sender end
function K.received(recipient) return P .. 'rid:' .. recipient end
function K.sealed(key_id) return P .. 'ck:' .. key_id end
function K.key(uuid, n) return P .. 'key:' .. uuid .. ':' .. string.format('%d', n) end
function K.keys(uuid) return P .. 'keys:' .. uuid end
function K.readers(uuid) return P .. 'rd:' .. uuid end
function K.reads(uuid) return P .. 'rs:' .. uuid end
function K.notices(reader) return P .. 'kn:' .. reader end
function K.noticed(uuid) return P .. 'kw:' .. uuid end
-- A history index: the deliveries ``sender`` sent ``recipient`` (either false: anyone), in
-- ``conversation`` (false: any). Every delivery is in the three of its sender and recipient,
-- and in the three of its message's conversation too if it has one.
function K.history(sender, recipient, conversation)
    local key
    if not sender then
        key = 'hr:' .. recipient
    elseif not recipient then
        key = 'hs:' .. sender
    else
        key = 'hp:' .. sender .. ':' .. recipient
    end
    if conversation then key = 'hc' .. string.sub(key, 2) .. ':' .. conversation end
    return P .. key
end
function K.topic(id) return P .. 't:' .. id end
function K.members(id) return P .. 'tm:' .. id end
function K.topic_history(id) return P .. 'th:' .. id end
function K.subscriptions(uuid) return P .. 'ct:' .. uuid end
function K.owned(uuid) return P .. 'to:' .. uuid end
function K.in_history_by(uuid) return P .. 'tp:' .. uuid end
K.schema = P .. 'schema'
K.migration = P .. 'schema:migration'
K.seq = P .. 'seq'
K.clients = P .. 'clients'
K.family_expiry = P .. 'fexp'
K.revoked = P .. 'rt'
K.revoked_by = P .. 'rtwho'
K.invites = P .. 'invites'
K.open_invites = P .. 'invites:open'
K.spent_invites = P .. 'invites:spent'
K.queues = P .. 'queues'
K.expiry = P .. 'exp'
K.finished = P .. 'fin'
K.accepted = P .. 'acc'
K.msgids = P .. 'ids'
K.key_ids = P .. 'ckeys'
K.plain = P .. 'cp'
K.forgetting = P .. 'forget'  -- hash: deleted client -> where forgetting its history is
K.topics = P .. 'topics'
K.open_topics = P .. 'topics:open'
K.aging = P .. 'tha'  -- zset: messages in a topic's history, by when they age out of it

-- --- helpers ----------------------------------------------------------------------------------

function U.int(n) return string.format('%d', n) end

-- A seq as a member of a time-ordered sorted set: zero-padded, so that ties of the score are
-- in seq order (members of equal score are ordered bytewise).
function U.pad(seq) return string.format('%016d', seq) end

-- Length-prefixed: a composite field whose parts cannot run into each other.
function U.lp(s) return #s .. ':' .. s end

function U.lt(a, b)
    local n = math.min(#a, #b)
    for i = 1, n do
        local x, y = string.byte(a, i), string.byte(b, i)
        if x ~= y then return x < y end
    end
    return #a < #b
end

function U.fail(message)
    return redis.error_reply('RELAYD ' .. message)
end

function U.live(uuid)
    local row = call('HMGET', K.client(uuid), 'ca', 'da')
    return row[1] ~= false and row[2] == false
end

-- Recipients whose queue and key ids whose content index an operation changed: the index
-- sets (``queues``, ``ckeys``) are brought up to date once, when the operation ends, rather
-- than after each message.
local TOUCHED = {queues = {}, key_ids = {}}
-- What a batch of ``execute`` learned once for all its operations.
local BATCH = {live = {}, high = 0, top = 0}

function U.reconcile()
    for recipient in pairs(TOUCHED.queues) do
        local verb = call('EXISTS', K.queue(recipient)) == 1 and 'SADD' or 'SREM'
        call(verb, K.queues, recipient)
    end
    for key_id in pairs(TOUCHED.key_ids) do
        local verb = call('EXISTS', K.sealed(key_id)) == 1 and 'SADD' or 'SREM'
        call(verb, K.key_ids, key_id)
    end
end

-- --- clients ----------------------------------------------------------------------------------

local CLIENT_FIELDS = {'n', 'h', 'r', 'ca', 'tv', 'da', 'pr', 'ls'}

function U.client_row(uuid)
    local row = call('HMGET', K.client(uuid), unpack(CLIENT_FIELDS))
    if row[4] == false then return false end
    return {uuid, row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8]}
end

function U.spend_invite(id, uuid, at)
    local row = call('HMGET', K.invite(id), 'ex', 'ua')
    if row[1] == false or row[2] ~= false or not (tonumber(row[1]) > tonumber(at)) then
        return false
    end
    call('HSET', K.invite(id), 'ua', at, 'ub', uuid)
    call('ZREM', K.open_invites, id)
    call('ZADD', K.spent_invites, at, id)
    return true
end

function OPS.insert_client(a)
    local uuid, name, hash, roles, at, valid_after, invite = unpack(a)
    if call('EXISTS', K.client(uuid)) == 1 then return 'uuid_taken' end
    if invite and not U.spend_invite(invite, uuid, at) then return 'invite_invalid' end
    call('HSET', K.client(uuid), 'n', name, 'h', hash, 'r', roles, 'ca', at, 'tv', valid_after)
    call('ZADD', K.clients, at, uuid)
    return 'inserted'
end

function OPS.rename_client(a)
    if not U.live(a[1]) then return 0 end
    call('HSET', K.client(a[1]), 'n', a[2])
    return 1
end

-- {uuid, enabled}: ``pr`` (its reads are private) is set while read receipts are off.
function OPS.set_read_receipts(a)
    if not U.live(a[1]) then return 0 end
    if a[2] == 1 then
        call('HDEL', K.client(a[1]), 'pr')
    else
        call('HSET', K.client(a[1]), 'pr', 1)
    end
    return 1
end

-- {uuid, at, uuid, at...}: ``ls``, when each last had a live socket, never set back.
function OPS.set_last_seen(a)
    for i = 1, #a, 2 do
        if U.live(a[i]) then
            local seen = call('HGET', K.client(a[i]), 'ls')
            if seen == false or tonumber(seen) < tonumber(a[i + 1]) then
                call('HSET', K.client(a[i]), 'ls', a[i + 1])
            end
        end
    end
    return 1
end

function OPS.set_roles(a)
    if not U.live(a[1]) then return 0 end
    call('HSET', K.client(a[1]), 'r', a[2])
    return 1
end

function U.revoke_tokens(uuid, at, reason)
    local live = U.live(uuid)
    if live then
        local valid_after = call('HGET', K.client(uuid), 'tv')
        if tonumber(at) > tonumber(valid_after) then
            call('HSET', K.client(uuid), 'tv', at)
        end
    end
    for _, family in ipairs(call('SMEMBERS', K.families_of(uuid))) do
        if call('HEXISTS', K.family(family), 'rv') == 0 then
            call('HSET', K.family(family), 'rv', at, 'rr', reason)
        end
    end
    return live
end

-- The proof of a secret or of a token still holds (see Store.set_secret).
function U.proof_holds(uuid, hash, issued_at)
    local row = call('HMGET', K.client(uuid), 'ca', 'da', 'h', 'tv')
    if row[1] == false or row[2] ~= false then return false end
    if hash and row[3] ~= hash then return false end
    if issued_at and not (tonumber(row[4]) <= tonumber(issued_at)) then return false end
    return true
end

function OPS.set_secret(a)
    local uuid, hash, revoke_at, replacing, issued_at = a[1], a[2], a[3], a[4], a[5]
    if not U.proof_holds(uuid, replacing, issued_at) then return 0 end
    call('HSET', K.client(uuid), 'h', hash)
    if revoke_at then U.revoke_tokens(uuid, revoke_at, 'secret_reset') end
    return 1
end

function OPS.get_client(a)
    return U.client_row(a[1])
end

function OPS.token_holder(a)
    local uuid, family = a[1], a[2]
    local client = U.client_row(uuid)
    if client == false or not family then return {client, 1} end
    local row = call('HMGET', K.family(family), 'c', 'rv')
    return {client, (row[1] == uuid and row[2] == false) and 1 or 0}
end

function OPS.list_clients(a)
    local rows = {}
    for i, uuid in ipairs(call('ZRANGE', K.clients, 0, -1)) do rows[i] = U.client_row(uuid) end
    return rows
end

function OPS.revoke_client_tokens(a)
    return U.revoke_tokens(a[1], a[2], 'client_revoked') and 1 or 0
end

function U.delete_family(id, uuid)
    call('DEL', K.family(id))
    call('ZREM', K.family_expiry, id)
    call('SREM', K.families_of(uuid), id)
end

-- {uuid, at, limit}: {1 if it was live, else 0; 1 if its history is not all forgotten yet}.
function OPS.delete_client(a)
    local uuid, at, limit = a[1], a[2], a[3]
    if type(limit) ~= 'number' or limit < 1 then return U.fail('a page of at least 1') end
    local live = U.live(uuid)
    if live then
        call('HSET', K.client(uuid), 'da', at, 'h', '', 'tv', at)
        call('ZREM', K.clients, uuid)
    end
    for _, family in ipairs(call('SMEMBERS', K.families_of(uuid))) do
        U.delete_family(family, uuid)
    end
    local more = 0
    if live then
        U.forget_keys(uuid)
        U.unsubscribe_all(uuid)
        -- Its history goes a page per call (forget_history): a big one would hold Redis. A
        -- page of each side here, so that a small one is forgotten in this call.
        call('HSET', K.forgetting, uuid, 'hs:0')
        more = OPS.forget_history({uuid, limit})
        if more == 1 then more = OPS.forget_history({uuid, limit}) end
    end
    return {live and 1 or 0, more}
end

-- {uuid, limit}: forget up to ``limit`` more of a deleted client's history (the final
-- deliveries it sent, then those it received with no receipt owed to their sender, by seq),
-- and their messages once they have no delivery left; what waits, for it or from it, stays
-- until it expires. Then its topics (U.forget_topics). The cursor is kept in ``forget``. 1
-- while more may remain, 0 once done (or never asked).
function OPS.forget_history(a)
    local uuid, limit = a[1], a[2]
    if type(limit) ~= 'number' or limit < 1 then return U.fail('a page of at least 1') end
    local at = call('HGET', K.forgetting, uuid)
    if not at then return 0 end
    local side, after = string.match(at, '^(%a+):(%d+)$')
    if side == 'tp' or side == 'to' then return U.forget_topics(uuid, side, limit) end
    local sent = side == 'hs'
    local index = sent and K.history(uuid, false) or K.history(false, uuid)
    local seqs = call('ZRANGEBYSCORE', index, '(' .. after, '+inf', 'LIMIT', 0, limit)
    for _, seq in ipairs(seqs) do
        seq = tonumber(seq)
        local row = call('HMGET', K.delivery(seq), 'st', 'rp', 'rq')
        -- A receipt (final or read) owed to another sender stays until told.
        if row[1] ~= false and (sent or (row[2] == '0' and row[3] ~= '1')) then
            U.delete_delivery(seq)
        end
    end
    if #seqs == limit then
        call('HSET', K.forgetting, uuid, side .. ':' .. U.int(tonumber(seqs[#seqs])))
    elseif sent then
        call('HSET', K.forgetting, uuid, 'hr:0')
    else
        return U.forget_next(uuid, 'hr')
    end
    return 1
end

-- {}: the deleted clients whose history is not all forgotten yet.
function OPS.forgetting(a)
    return call('HKEYS', K.forgetting)
end

-- --- refresh families and revoked tokens ------------------------------------------------------

function OPS.create_family(a)
    local family, uuid, jti, at, expires_at, hash, issued_at = unpack(a)
    if (hash or issued_at) and not U.proof_holds(uuid, hash, issued_at) then return 0 end
    if call('EXISTS', K.client(uuid)) == 0 then
        return U.fail('no client ' .. uuid .. ' for refresh family ' .. family)
    end
    if call('EXISTS', K.family(family)) == 1 then
        return U.fail('refresh family ' .. family .. ' exists')
    end
    call('HSET', K.family(family), 'c', uuid, 'j', jti, 'ca', at, 'ra', at, 'ex', expires_at)
    call('SADD', K.families_of(uuid), family)
    call('ZADD', K.family_expiry, expires_at, family)
    return 1
end

function OPS.rotate_family(a)
    local family, presented, jti, at, expires_at = a[1], a[2], a[3], a[4], a[5]
    local row = call('HMGET', K.family(family), 'c', 'j', 'rv')
    if row[1] == false then return 'unknown' end
    if row[3] ~= false then return 'revoked' end
    if row[2] ~= presented then
        call('HSET', K.family(family), 'rv', at, 'rr', 'reused')
        return 'reused'
    end
    call('HSET', K.family(family), 'j', jti, 'ra', at, 'ex', expires_at)
    call('ZADD', K.family_expiry, expires_at, family)
    return 'rotated'
end

function OPS.revoke_family(a)
    local family, at, reason = a[1], a[2], a[3]
    local row = call('HMGET', K.family(family), 'c', 'rv')
    if row[1] == false or row[2] ~= false then return 0 end
    call('HSET', K.family(family), 'rv', at, 'rr', reason)
    return 1
end

function OPS.get_family(a)
    local row = call('HMGET', K.family(a[1]), 'c', 'j', 'ex', 'rv')
    if row[1] == false then return false end
    return row
end

function OPS.purge_expired_families(a)
    local due = call('ZRANGEBYSCORE', K.family_expiry, '-inf', '(' .. a[1])
    for _, family in ipairs(due) do
        U.delete_family(family, call('HGET', K.family(family), 'c'))
    end
    return #due
end

function OPS.revoke_token(a)
    local jti, subject, at, expires_at = a[1], a[2], a[3], a[4]
    if call('ZSCORE', K.revoked, jti) == false then
        call('ZADD', K.revoked, expires_at, jti)
        call('HSET', K.revoked_by, jti, mp_pack({subject, at}))
    end
    return 0
end

function OPS.revoked_token_ids(a)
    local expired = call('ZRANGEBYSCORE', K.revoked, '-inf', '(' .. a[1])
    for _, jti in ipairs(expired) do
        call('ZREM', K.revoked, jti)
        call('HDEL', K.revoked_by, jti)
    end
    return call('ZRANGE', K.revoked, 0, -1)
end

-- --- invites ----------------------------------------------------------------------------------

function OPS.create_invite(a)
    local id, by, at, expires_at, max_open = a[1], a[2], a[3], a[4], a[5]
    if call('ZCOUNT', K.open_invites, '(' .. at, '+inf') >= max_open then return 0 end
    if call('EXISTS', K.invite(id)) == 1 then return U.fail('invite ' .. id .. ' exists') end
    call('HSET', K.invite(id), 'ca', at, 'cb', by, 'ex', expires_at)
    call('ZADD', K.invites, at, id)
    call('ZADD', K.open_invites, expires_at, id)
    return 1
end

function OPS.list_invites(a)
    local rows = {}
    for i, id in ipairs(call('ZRANGE', K.invites, 0, -1)) do
        local row = call('HMGET', K.invite(id), 'ca', 'cb', 'ex', 'ua', 'ub')
        rows[i] = {id, row[1], row[2], row[3], row[4], row[5]}
    end
    return rows
end

function U.delete_invite(id)
    call('DEL', K.invite(id))
    call('ZREM', K.invites, id)
    call('ZREM', K.open_invites, id)
    call('ZREM', K.spent_invites, id)
end

function OPS.purge_invites(a)
    local now, spent_before = a[1], a[2]
    local expired = call('ZRANGEBYSCORE', K.open_invites, '-inf', '(' .. now)
    local spent = call('ZRANGEBYSCORE', K.spent_invites, '-inf', '(' .. spent_before)
    for _, id in ipairs(expired) do U.delete_invite(id) end
    for _, id in ipairs(spent) do U.delete_invite(id) end
    return #expired + #spent
end

-- --- the key directory ------------------------------------------------------------------------

-- The client's key records: {n, algorithm, key, fingerprint, published_at, superseded_at}.
function U.key_records(uuid)
    local records = {}
    for i, n in ipairs(call('ZRANGE', K.keys(uuid), 0, -1)) do
        local row = call('HMGET', K.key(uuid, tonumber(n)), 'a', 'k', 'f', 'p', 's')
        records[i] = {tonumber(n), row[1], row[2], row[3], row[4], row[5]}
    end
    return records
end

function U.replace_key(uuid, algorithm, key, fp, at, max_superseded)
    for _, record in ipairs(U.key_records(uuid)) do
        if record[2] == algorithm and record[6] == false then
            call('HSET', K.key(uuid, record[1]), 's', at)
        end
    end
    local n = call('HINCRBY', K.client(uuid), 'kseq', 1)
    call('HSET', K.key(uuid, n), 'a', algorithm, 'k', key, 'f', fp, 'p', at)
    call('ZADD', K.keys(uuid), n, n)
    local superseded = {}
    for _, record in ipairs(U.key_records(uuid)) do
        if record[6] ~= false then superseded[#superseded + 1] = record end
    end
    if #superseded <= max_superseded then return end
    -- The newest are kept: superseded_at descending, then the newest record first.
    table.sort(superseded, function(x, y)
        local sx, sy = tonumber(x[6]), tonumber(y[6])
        if sx ~= sy then return sx > sy end
        return x[1] > y[1]
    end)
    for i = max_superseded + 1, #superseded do
        call('DEL', K.key(uuid, superseded[i][1]))
        call('ZREM', K.keys(uuid), superseded[i][1])
    end
end

function U.notice_field(uuid, algorithm) return U.lp(uuid) .. algorithm end

-- A reader's notices in time order (newest first, or oldest first), then by client and
-- algorithm.
function U.notices_by_time(reader, newest_first)
    local notices = {}
    for _, blob in ipairs(call('HVALS', K.notices(reader))) do
        notices[#notices + 1] = mp_unpack(blob)
    end
    table.sort(notices, function(x, y)
        local cx, cy = tonumber(x[5]), tonumber(y[5])
        if cx ~= cy then return (cx > cy) == newest_first end
        if x[1] ~= y[1] then return U.lt(x[1], y[1]) end
        return U.lt(x[2], y[2])
    end)
    return notices
end

function U.drop_notice(reader, uuid, algorithm)
    call('HDEL', K.notices(reader), U.notice_field(uuid, algorithm))
    if call('HINCRBY', K.noticed(uuid), reader, -1) <= 0 then
        call('HDEL', K.noticed(uuid), reader)
    end
end

-- Owe ``reader`` the change of ``uuid``'s ``algorithm`` key from ``previous`` to ``fp``; a
-- notice already owed keeps its previous. Returns the previous the reader is told.
function U.owe_notice(reader, uuid, algorithm, fp, previous, at, max_notices)
    local field = U.notice_field(uuid, algorithm)
    local owed = call('HGET', K.notices(reader), field)
    if owed then
        previous = mp_unpack(owed)[4]
    else
        call('HINCRBY', K.noticed(uuid), reader, 1)
    end
    -- {client, algorithm, fingerprint, previous, changed_at}
    call('HSET', K.notices(reader), field, mp_pack({uuid, algorithm, fp, previous, at}))
    if call('HLEN', K.notices(reader)) > max_notices then
        local notices = U.notices_by_time(reader, true)
        for i = max_notices + 1, #notices do
            U.drop_notice(reader, notices[i][1], notices[i][2])
        end
    end
    return previous
end

function OPS.publish_keys(a)
    local uuid, keys, at, max_superseded, max_notices = a[1], a[2], a[3], a[4], a[5]
    if not U.live(uuid) then return false end
    local changed, notices = {}, {}
    for _, key in ipairs(keys) do
        local algorithm, raw, fp = key[1], key[2], key[3]
        local previous = false
        for _, record in ipairs(U.key_records(uuid)) do
            if record[2] == algorithm and record[6] == false then previous = record[4] end
        end
        if previous ~= fp then
            changed[#changed + 1] = algorithm
            U.replace_key(uuid, algorithm, raw, fp, at, max_superseded)
            if previous then
                local readers = call('ZRANGE', K.readers(uuid), 0, -1)
                table.sort(readers, U.lt)
                for _, reader in ipairs(readers) do
                    local told = U.owe_notice(reader, uuid, algorithm, fp, previous, at, max_notices)
                    notices[#notices + 1] = {reader, uuid, algorithm, fp, told, at}
                end
            end
        end
    end
    return {changed, notices}
end

function U.record_reader(uuid, reader, at, max_readers)
    call('ZADD', K.readers(uuid), at, reader)
    call('SADD', K.reads(reader), uuid)
    if call('ZCARD', K.readers(uuid)) <= max_readers then return end
    local flat = call('ZRANGE', K.readers(uuid), 0, -1, 'WITHSCORES')
    local readers = {}
    for i = 1, #flat, 2 do readers[#readers + 1] = {flat[i], tonumber(flat[i + 1])} end
    -- The most recent are kept: read_at descending, then reader.
    table.sort(readers, function(x, y)
        if x[2] ~= y[2] then return x[2] > y[2] end
        return U.lt(x[1], y[1])
    end)
    for i = max_readers + 1, #readers do
        call('ZREM', K.readers(uuid), readers[i][1])
        call('SREM', K.reads(readers[i][1]), uuid)
    end
end

function OPS.read_keys(a)
    local uuid, reader, at, max_readers = a[1], a[2], a[3], a[4]
    if not U.live(uuid) then return false end
    if reader and reader ~= uuid then U.record_reader(uuid, reader, at, max_readers) end
    return U.key_records(uuid)
end

-- A deleted client: its keys, who read them, what it read, and what it was owed go.
function U.forget_keys(uuid)
    for _, n in ipairs(call('ZRANGE', K.keys(uuid), 0, -1)) do
        call('DEL', K.key(uuid, tonumber(n)))
    end
    call('DEL', K.keys(uuid))
    call('HDEL', K.client(uuid), 'kseq')
    for _, reader in ipairs(call('ZRANGE', K.readers(uuid), 0, -1)) do
        call('SREM', K.reads(reader), uuid)
    end
    call('DEL', K.readers(uuid))
    for _, owner in ipairs(call('SMEMBERS', K.reads(uuid))) do
        call('ZREM', K.readers(owner), uuid)
    end
    call('DEL', K.reads(uuid))
    for _, blob in ipairs(call('HVALS', K.notices(uuid))) do
        local notice = mp_unpack(blob)
        U.drop_notice(uuid, notice[1], notice[2])
    end
    call('DEL', K.notices(uuid))
    for _, reader in ipairs(call('HKEYS', K.noticed(uuid))) do
        for _, blob in ipairs(call('HVALS', K.notices(reader))) do
            local notice = mp_unpack(blob)
            if notice[1] == uuid then
                call('HDEL', K.notices(reader), U.notice_field(uuid, notice[2]))
            end
        end
    end
    call('DEL', K.noticed(uuid))
end

-- --- messages and their deliveries -----------------------------------------------------------
--
-- A message is stored once (m:<id>); each recipient's copy of it is a delivery (dl:<seq>) with
-- its own seq, attempts and status. A message's id is the seq of its first delivery. The
-- queue, expiry, finished and receipt indexes hold deliveries; dedupe, msgid counts, accepted
-- times and content keys hold messages.

-- {seq, sender, recipient, msgid, high, acknowledge, fields, key_id, accepted_at, expires_at,
-- attempts, message id, address, topic, offset}: a StoredMessage, its fields as stored (sealed
-- or plain), and what its content is bound to (its message's id and address).
function U.delivery_row(seq)
    local d = call('HMGET', K.delivery(seq), 'm', 's', 'r', 'ex', 'n')
    local id = tonumber(d[1])
    local m = call('HMGET', K.message(id), 'i', 'h', 'a', 'f', 'k', 'at', 'r', 'tp', 'to')
    return {seq, d[2], d[3], m[1], m[2], m[3], m[4], m[5], m[6], d[4], d[5], id, m[7], m[8],
        m[9]}
end

-- {id, sender, address, msgid, fields, key_id}: a message's content as stored.
function U.content_row(id)
    local m = call('HMGET', K.message(id), 's', 'r', 'i', 'f', 'k')
    return {id, m[1], m[2], m[3], m[4], m[5]}
end

function U.msgid_member(msgid, seq) return U.lp(msgid) .. U.pad(seq) end

-- Index a stored message's content under the key it is sealed with (or as plain text).
function U.index_content(id, fields, key_id)
    if fields == '' then return end
    if key_id then
        call('ZADD', K.sealed(key_id), id, id)
        TOUCHED.key_ids[key_id] = true
    else
        call('ZADD', K.plain, id, id)
    end
end

function U.unindex_content(id, fields, key_id)
    if fields == '' then return end
    if key_id then
        call('ZREM', K.sealed(key_id), id)
        TOUCHED.key_ids[key_id] = true
    else
        call('ZREM', K.plain, id)
    end
end

function U.dequeue(seq, recipient)
    call('ZREM', K.queue(recipient), seq)
    TOUCHED.queues[recipient] = true
    call('ZREM', K.expiry, U.pad(seq))
end

-- The history indexes a delivery is in (K.history): by its recipient, by its sender, by the
-- two, and the same in its message's conversation.
-- ``fanout``: a topic's (or broadcast's) delivery, kept out of its sender's sent index (its
-- publisher's history lists it once, in the topic's, not once per subscriber).
function U.history_keys(sender, recipient, conversation, fanout)
    local keys = {}
    for _, within in ipairs({false, conversation}) do
        keys[#keys + 1] = K.history(false, recipient, within)
        if not fanout then keys[#keys + 1] = K.history(sender, false, within) end
        keys[#keys + 1] = K.history(sender, recipient, within)
        if not conversation then break end
    end
    return keys
end

-- ``verb``: ZADD (a delivery stored) or ZREM (purged).
function U.history_index(verb, seq, sender, recipient, conversation, fanout)
    for _, key in ipairs(U.history_keys(sender, recipient, conversation, fanout)) do
        if verb == 'ZADD' then call('ZADD', key, seq, seq) else call('ZREM', key, seq) end
    end
end

-- The sender and msgid (length-prefixed, joined) of the message a seq holds: the message of
-- the delivery with that seq, else the message with that id; nil if none.
function U.holder(seq)
    -- One call for the common case, a seq that holds nothing yet.
    if call('EXISTS', K.delivery(seq), K.message(seq)) == 0 then return nil end
    local id = call('HGET', K.delivery(seq), 'm')
    local row = call('HMGET', K.message(id and tonumber(id) or seq), 's', 'i')
    if row[1] == false then return nil end
    return U.lp(row[1]) .. row[2]
end

-- A delivery of message ``id`` (in ``conversation``, or false) to ``recipient``: queued, or
-- (``status`` given) final already, and then delivered when it was accepted if it was.
function U.add_delivery(seq, id, sender, recipient, msgid, expires_at, attempts, status, at,
                        pending, reason, conversation, fanout)
    local row = {'m', id, 's', sender, 'r', recipient, 'ex', expires_at, 'n', attempts,
        'rs', reason, 'rp', pending}
    if status then
        row[#row + 1], row[#row + 2], row[#row + 3], row[#row + 4] = 'st', status, 'fa', at
        if status == 'delivered' then row[#row + 1], row[#row + 2] = 'dv', at end
    end
    call('HSET', K.delivery(seq), unpack(row))
    call('ZADD', K.received(recipient), 0, U.msgid_member(msgid, seq))
    U.history_index('ZADD', seq, sender, recipient, conversation, fanout)
    if status then
        call('ZADD', K.finished, at, U.pad(seq))
        if pending == 1 then call('ZADD', K.receipts(sender), seq, seq) end
    else
        call('ZADD', K.queue(recipient), seq, seq)
        TOUCHED.queues[recipient] = true
        call('ZADD', K.expiry, expires_at, U.pad(seq))
    end
end

-- Insert = {'I', seq, sender, recipient, msgid, high, acknowledge, fields, key_id, accepted_at,
-- expires_at, attempts, status, receipt_pending, reason, conversation_id}: message ``seq`` and
-- its one delivery, ``seq`` too.
function U.insert(op, max_queued)
    local _, seq, sender, recipient, msgid, high, ack, fields, key_id, accepted_at,
        expires_at, attempts, status, pending, reason, conversation = unpack(op)
    local existing = call('HGET', K.sent(sender), msgid)
    if existing and tonumber(existing) == seq then
        -- This very Insert, sent again: its batch was applied but its answer lost (a
        -- deadline, a failed WAIT), and the hub retried it.
        return {1, seq}
    end
    if existing then
        -- Reported as its first delivery, whose seq is the message's id.
        return {2, tonumber(existing), call('HGET', K.delivery(tonumber(existing)), 'st')}
    end
    if not status then
        -- No operation of a batch changes who is a client: asked once per batch.
        if BATCH.live[recipient] == nil then BATCH.live[recipient] = U.live(recipient) end
        if not BATCH.live[recipient] then return {3, 'unknown_recipient'} end
        if call('ZCARD', K.queue(recipient)) >= max_queued then return {3, 'queue_full'} end
    end
    local row = {'s', sender, 'r', recipient, 'i', msgid, 'h', high, 'a', ack, 'f', fields,
        'at', accepted_at, 'ex', expires_at, 'nd', 1, 'nq', status and 0 or 1}
    if key_id then
        row[#row + 1], row[#row + 2] = 'k', key_id
    end
    if conversation then
        row[#row + 1], row[#row + 2] = 'cv', conversation
    end
    call('HSET', K.message(seq), unpack(row))
    call('HSET', K.sent(sender), msgid, seq)
    call('HINCRBY', K.msgids, msgid, 1)
    call('ZADD', K.accepted, accepted_at, U.pad(seq))
    U.index_content(seq, fields, key_id)
    U.add_delivery(seq, seq, sender, recipient, msgid, expires_at, attempts, status,
        accepted_at, pending, reason, conversation)
    BATCH.high = math.max(BATCH.high, seq)
    return {1, seq}
end

-- A delivery of message ``id`` left the queue with ``status``: once none of its deliveries is
-- queued, its content is no longer needed, and goes, unless history keeps it (``keep``, or
-- its topic's history: ``ih``). A topic message counts its deliveries by status.
function U.settle(id, keep, status)
    local key = K.message(id)
    local row = call('HMGET', key, 'nq', 'f', 'k', 'tp', 'ih')
    if row[4] then call('HINCRBY', key, 'n:' .. status, 1) end
    local queued = tonumber(row[1]) - 1
    if queued > 0 or keep or row[5] == '1' then
        call('HSET', key, 'nq', queued)
        return
    end
    call('HSET', key, 'nq', 0, 'f', '')
    call('HDEL', key, 'k')
    U.unindex_content(id, row[2], row[3])
end

-- Finish = {'F', seq, status, finished_at, receipt_pending, reason, keep_content,
-- delivered_at or false}: a delivered one was delivered when it finished, unless a SetAttempts
-- said when before; another, at ``delivered_at`` if it was written and nothing said when.
function U.finish(op)
    local seq, status, finished_at, pending, reason = op[2], op[3], op[4], op[5], op[6]
    local key = K.delivery(seq)
    local row = call('HMGET', key, 'r', 'st', 's', 'm', 'dv')
    if row[1] == false or row[2] ~= false then return false end
    local fields = {'st', status, 'fa', finished_at, 'rp', pending, 'rs', reason}
    if status == 'delivered' and row[5] == false then
        fields[#fields + 1], fields[#fields + 2] = 'dv', finished_at
    elseif op[8] and row[5] == false then
        fields[#fields + 1], fields[#fields + 2] = 'dv', op[8]
    end
    call('HSET', key, unpack(fields))
    U.dequeue(seq, row[1])
    call('ZADD', K.finished, finished_at, U.pad(seq))
    if pending == 1 then call('ZADD', K.receipts(row[3]), seq, seq) end
    U.settle(tonumber(row[4]), op[7] == 1, status)
    return false
end

-- SetAttempts = {'A', seq, attempts, at}: the first ``at`` is when it was delivered; back to
-- no attempt (one counted but never made), it was not.
function U.set_attempts(op)
    local key = K.delivery(op[2])
    local row = call('HMGET', key, 'r', 'st', 'dv')
    if row[1] == false or row[2] ~= false then return false end
    if op[3] == 0 then
        call('HSET', key, 'n', 0)
        call('HDEL', key, 'dv')
    elseif op[4] and row[3] == false then
        call('HSET', key, 'n', op[3], 'dv', op[4])
    else
        call('HSET', key, 'n', op[3])
    end
    return false
end

-- SetReceiptPending = {'P', {seq...}, pending}: a delivery stays in its sender's ``rc`` while
-- its final status or its read receipt (``rq``) is owed.
function U.set_receipt_pending(op)
    for _, seq in ipairs(op[2]) do
        local key = K.delivery(seq)
        local row = call('HMGET', key, 'st', 's', 'rq')
        if row[1] ~= false then
            call('HSET', key, 'rp', op[3])
            if op[3] == 1 then
                call('ZADD', K.receipts(row[2]), seq, seq)
            elseif row[3] ~= '1' then
                call('ZREM', K.receipts(row[2]), seq)
            end
        end
    end
    return false
end

-- MarkRead = {'M', reader, msgid, sender or false, at}: the newest delivery of msgid to the
-- reader (from that sender), read at ``at`` unless it was read before. {code}, or {code, seq,
-- sender, read_at, owed}. ``ra`` read_at, ``rq`` the read receipt owed (0/1), ``rh`` hidden
-- from the sender (the reader had read receipts off).
function U.mark_read(op)
    local reader, msgid, sender, at = op[2], op[3], op[4], op[5]
    local prefix = U.lp(msgid)
    local seq, from
    -- Newest first; a delivery of another sender's is passed over (one per sender at most).
    for _, member in ipairs(call('ZREVRANGEBYLEX', K.received(reader), '[' .. prefix .. '\255',
            '[' .. prefix)) do
        local candidate = tonumber(string.sub(member, #prefix + 1))
        local s = call('HGET', K.delivery(candidate), 's')
        if not sender or s == sender then
            seq, from = candidate, s
            break
        end
    end
    if not seq then
        if call('HEXISTS', K.msgids, msgid) == 1 then return {'not_yours'} end
        return {'unknown_message'}
    end
    local key = K.delivery(seq)
    local row = call('HMGET', key, 'dv', 'ra', 'm')
    if row[2] ~= false then return {'already_read', seq, from, row[2], 0} end
    if row[1] == false then return {'not_delivered', seq, from, false, 0} end
    -- A topic message's publisher is never told each subscriber's read (one frame each).
    if call('HEXISTS', K.client(reader), 'pr') == 1
            or call('HEXISTS', K.message(tonumber(row[3])), 'tp') == 1 then
        call('HSET', key, 'ra', at, 'rh', 1)
        return {'read', seq, from, at, 0}
    end
    call('HSET', key, 'ra', at, 'rq', 1)
    call('ZADD', K.receipts(from), seq, seq)
    return {'read', seq, from, at, 1}
end

-- ClearReadPending = {'T', {seq...}}
function U.clear_read_pending(op)
    for _, seq in ipairs(op[2]) do
        local key = K.delivery(seq)
        local row = call('HMGET', key, 's', 'rq', 'rp')
        if row[2] == '1' then
            call('HSET', key, 'rq', 0)
            if row[3] ~= '1' then call('ZREM', K.receipts(row[1]), seq) end
        end
    end
    return false
end

-- LoadQueue = {'Q', recipient, after, limit, max_bytes}: up to limit + 1 rows, and no more
-- than the page can take. Python measures each row's text (size_of) once decrypted; here, a
-- row of n bytes of UTF-8 is at least n / 2 bytes of text, so once those lower bounds pass
-- max_bytes, no later row can be on the page, and the one that passed them (past the first,
-- which always comes) tells Python that more wait.
function U.load_queue(op)
    local recipient, after, limit, max_bytes = op[2], op[3], op[4], op[5]
    local seqs = call('ZRANGEBYSCORE', K.queue(recipient), '(' .. U.int(after), '+inf',
        'LIMIT', 0, limit + 1)
    local rows, least = {}, 0
    for _, seq in ipairs(seqs) do
        local row = U.delivery_row(tonumber(seq))
        rows[#rows + 1] = row
        local text = #row[7] - (row[8] and 28 or 0)  -- a sealed row: nonce and tag
        least = least + math.floor(text / 2)
        if least > max_bytes and #rows >= 2 then break end
    end
    return rows
end

-- LoadReceipts = {'R', sender, after, limit}
function U.load_receipts(op)
    local seqs = call('ZRANGEBYSCORE', K.receipts(op[2]), '(' .. U.int(op[3]), '+inf',
        'LIMIT', 0, op[4])
    local rows = {}
    for i, seq in ipairs(seqs) do
        local d = call('HMGET', K.delivery(tonumber(seq)), 'm', 'r', 'st', 'fa', 'rs', 'rp', 'rq',
            'ra')
        local msgid = call('HGET', K.message(tonumber(d[1])), 'i')
        -- {seq, msgid, recipient, status, finished_at, reason, final owed, read_at if owed}
        rows[i] = {tonumber(seq), msgid, d[2], d[3], d[4], d[5] or '', d[6] == '1' and 1 or 0,
            d[7] == '1' and d[8]}
    end
    return rows
end

-- FindExpired = {'X', now, limit}
function U.find_expired(op)
    local rows = {}
    for i, seq in ipairs(call('ZRANGEBYSCORE', K.expiry, '-inf', op[2], 'LIMIT', 0, op[3])) do
        rows[i] = U.delivery_row(tonumber(seq))
    end
    return rows
end

-- ``message``: its {sender, msgid, fields, key_id}.
function U.delete_message(id, message)
    local sender, msgid = message[1], message[2]
    if call('HGET', K.sent(sender), msgid) == U.int(id) then
        call('HDEL', K.sent(sender), msgid)
    end
    if call('HINCRBY', K.msgids, msgid, -1) <= 0 then call('HDEL', K.msgids, msgid) end
    call('ZREM', K.accepted, U.pad(id))
    U.unindex_content(id, message[3], message[4])
    call('DEL', K.message(id))
end

-- A final delivery, and its message once it has no delivery left (unless a topic's history
-- keeps it).
function U.delete_delivery(seq)
    local key = K.delivery(seq)
    local row = call('HMGET', key, 'm', 's', 'r', 'st')
    local id = tonumber(row[1])
    local message = call('HMGET', K.message(id), 's', 'i', 'f', 'k', 'nd', 'cv', 'tp', 'ih')
    call('ZREM', K.received(row[3]), U.msgid_member(message[2], seq))
    call('ZREM', K.finished, U.pad(seq))
    call('ZREM', K.receipts(row[2]), seq)
    U.history_index('ZREM', seq, row[2], row[3], message[6], message[7] ~= false)
    call('DEL', key)
    if message[7] and row[4] then call('HINCRBY', K.message(id), 'n:' .. row[4], -1) end
    local left = tonumber(message[5]) - 1
    if left > 0 or message[8] == '1' then
        call('HSET', K.message(id), 'nd', left)
    else
        U.delete_message(id, message)
    end
end

-- Purge = {'G', finished_before, receipts_before, page, skip, now or false}: final deliveries
-- whose sender was told (or never came for its receipt), then the messages left with no
-- delivery; at most ``page`` of the oldest candidates a call (Redis runs nothing else
-- meanwhile), past the ``skip`` first (kept: a receipt still owed). With ``now``, a page of
-- the topic messages older than their topic's history_age leave its history too (U.trim_aged).
-- {1 if more deliveries may remain, skip, 1 if more topic messages may have aged} for the next
-- calls (OPS.purge, OPS.trim_aged).
function U.purge(op)
    local finished_before, receipts_before, page, skip = op[2], op[3], op[4], op[5]
    local aged = 0
    if op[6] then aged = U.trim_aged(op[6], page) end
    local before = finished_before
    if tonumber(receipts_before) > tonumber(finished_before) then before = receipts_before end
    local candidates = call('ZRANGEBYSCORE', K.finished, '-inf', '(' .. before, 'LIMIT', skip,
        page)
    for _, padded in ipairs(candidates) do
        local seq = tonumber(padded)
        local row = call('HMGET', K.delivery(seq), 'rp', 'fa', 'rq')
        local finished_at = tonumber(row[2])
        if (row[1] == '0' and row[3] ~= '1' and finished_at < tonumber(finished_before))
            or finished_at < tonumber(receipts_before) then
            U.delete_delivery(seq)
        else
            skip = skip + 1
        end
    end
    return {#candidates == page and 1 or 0, skip, aged}
end

-- {now, page}: a Purge's next page of topic messages that aged out of their history.
function OPS.trim_aged(a)
    if type(a[2]) ~= 'number' or a[2] < 1 then return U.fail('a page of at least 1') end
    return U.trim_aged(a[1], a[2])
end

-- {finished_before, receipts_before, page, skip}: a Purge's next call.
function OPS.purge(a)
    if type(a[3]) ~= 'number' or a[3] < 1 or type(a[4]) ~= 'number' or a[4] < 0 then
        return U.fail('a page of at least 1, and a skip of at least 0')
    end
    return U.purge({'G', a[1], a[2], a[3], a[4], false})
end

-- LoadKeyNotices = {'N', reader, limit}: oldest first.
function U.load_key_notices(op)
    local reader, limit = op[2], op[3]
    local rows = {}
    for i, n in ipairs(U.notices_by_time(reader, false)) do
        if limit >= 0 and i > limit then break end  -- as SQL: a negative LIMIT is none
        rows[i] = {reader, n[1], n[2], n[3], n[4], n[5]}
    end
    return rows
end

-- ClearKeyNotice = {'C', reader, client, algorithm, fingerprint, changed_at}
function U.clear_key_notice(op)
    local reader, uuid, algorithm, fp, changed_at = op[2], op[3], op[4], op[5], op[6]
    local owed = call('HGET', K.notices(reader), U.notice_field(uuid, algorithm))
    if owed then
        local notice = mp_unpack(owed)
        if notice[3] == fp and tonumber(notice[5]) == tonumber(changed_at) then
            U.drop_notice(reader, uuid, algorithm)
        end
    end
    return false
end

-- --- topics -----------------------------------------------------------------------------------
--
-- A topic (t:<id>) has its members (tm:<id>) and its history (th:<id>: message ids by offset);
-- each client's subscriptions (ct:<uuid>) and the topics it owns (to:<uuid>) are indexed for
-- its limits and its deletion. A published message is a message (m:<id>, address '#<topic>')
-- with ``tp`` its topic and ``to`` its offset for good, ``ih`` 1 while its topic's history
-- keeps it (its content and record stay then, whatever its deliveries), and a count of its
-- deliveries per final status (``n:<status>``); each subscriber's copy is a delivery like any.
--
-- tm:<id> holds live clients only: subscribing checks, and a client's deletion ends its
-- subscriptions in the call that makes its tombstone. A publish need not ask.

local TOPIC_FIELDS = {'c', 'md', 'ac', 'pb', 'pr', 'hn', 'ha', 'ca', 'lo'}

-- {id, creator, metadata, access, publish, presence, history_count, history_age, created_at,
-- subscribers, last_offset}, or false.
function U.topic_row(id)
    local t = call('HMGET', K.topic(id), unpack(TOPIC_FIELDS))
    if t[1] == false then return false end
    return {id, t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], call('ZCARD', K.members(id)),
        t[9]}
end

-- A lexicographic range's start after ``after`` (false: from the first).
function U.after(after) return after and '(' .. after or '-' end

-- The score of ``tha``: when a message accepted at ``accepted_at`` ages out of a history that
-- keeps ``age`` seconds (rounded, as a sum of floats is: U.trim_aged checks each exactly).
function U.ages_out(accepted_at, age)
    return string.format('%.17g', tonumber(accepted_at) + tonumber(age))
end

-- Message ``id`` of ``sender`` joins ``topic``'s history at ``offset``.
function U.enter_history(id, topic, sender, offset, accepted_at, age)
    call('ZADD', K.topic_history(topic), offset, id)
    call('ZADD', K.aging, U.ages_out(accepted_at, age), U.pad(id))
    call('ZADD', K.in_history_by(sender), id, id)
end

-- Message ``id`` leaves its topic's history: its content goes unless a delivery of it is
-- queued, and its record too if no delivery of it is left.
function U.leave_history(id)
    local key = K.message(id)
    local m = call('HMGET', key, 'ih', 'tp', 's', 'i', 'f', 'k', 'nq', 'nd')
    if m[1] ~= '1' then return end
    call('HDEL', key, 'ih')
    call('ZREM', K.topic_history(m[2]), id)
    call('ZREM', K.aging, U.pad(id))
    call('ZREM', K.in_history_by(m[3]), id)
    local fields, key_id = m[5], m[6]
    if tonumber(m[7]) == 0 then
        call('HSET', key, 'f', '')
        call('HDEL', key, 'k')
        U.unindex_content(id, fields, key_id)
        fields, key_id = '', false
    end
    if tonumber(m[8]) == 0 then U.delete_message(id, {m[3], m[4], fields, key_id}) end
end

-- The messages of ``topic`` at offsets up to ``up_to`` leave its history.
function U.trim(topic, up_to)
    for _, id in ipairs(call('ZRANGEBYSCORE', K.topic_history(topic), '-inf', up_to)) do
        U.leave_history(tonumber(id))
    end
end

-- At most ``page`` of the messages older than their topic's history_age at ``now`` leave its
-- history: 1 if more may be due, else 0.
function U.trim_aged(now, page)
    local due = call('ZRANGEBYSCORE', K.aging, '-inf', '(' .. now, 'LIMIT', 0, page)
    for _, padded in ipairs(due) do
        local id = tonumber(padded)
        local m = call('HMGET', K.message(id), 'at', 'tp')
        local age = call('HGET', K.topic(m[2]), 'ha')
        -- Compared as SQLite does; one due by its rounded score only waits for the next purge,
        -- as does everything after it.
        if not (tonumber(m[1]) < tonumber(now) - tonumber(age)) then return 0 end
        U.leave_history(id)
    end
    return #due == page and 1 or 0
end

-- The counter raised to ``seq`` if it is below (never lowered): seqs it hands out then pass
-- ``seq``.
function U.raise_seq(seq)
    if seq > tonumber(call('GET', K.seq) or '0') then call('SET', K.seq, U.int(seq)) end
end

-- What the Publish that stored message ``id`` answered: its queued deliveries are the first
-- ``dn - nf`` of the ``dn`` seqs from ``d0`` (those still stored), then came the failed ones.
function U.published(id)
    local m = call('HMGET', K.message(id), 'to', 'd0', 'dn', 'nf')
    local recipients, seqs = {}, {}
    if m[2] then
        local first = tonumber(m[2])
        for seq = first, first + tonumber(m[3]) - tonumber(m[4]) - 1 do
            local recipient = call('HGET', K.delivery(seq), 'r')
            if recipient then
                recipients[#recipients + 1], seqs[#seqs + 1] = recipient, seq
            end
        end
    end
    return {1, id, tonumber(m[1]) or 0, recipients, seqs, tonumber(m[4])}
end

-- Publish = {'B', id, topic, sender, msgid, high, acknowledge, fields, key_id, accepted_at,
-- expires_at, admin, conversation_id}: message ``id`` (a seq reserved for it, which its
-- content is sealed for) stored once, and a delivery of it to each subscriber but the sender,
-- in uuid order: first those queued, then those failed at once (their queue is full). Their
-- seqs are taken from the counter now, above every seq reserved or stored (and above this
-- batch's Inserts). {1, id, offset, {recipient...}, {seq...}, full} (the queued deliveries),
-- {2, id of the message with that msgid, false} or {3, reason}.
function U.publish(op, max_queued)
    local _, id, topic, sender, msgid, high, ack, fields, key_id, accepted_at, expires_at,
        admin, conversation = unpack(op)
    -- '*' (records.BROADCAST): every live client, admins only, in no history.
    local broadcast = topic == '*'
    local t = broadcast and {sender, 'owner', 0, 0, 0}
        or call('HMGET', K.topic(topic), 'c', 'pb', 'hn', 'ha', 'lo')
    if t[1] == false then return {3, 'topic_not_found'} end
    local existing = call('HGET', K.sent(sender), msgid)
    if existing and tonumber(existing) == id then
        -- This very Publish, sent again: its batch was applied but its answer lost (a
        -- deadline, a failed WAIT), and the hub retried it.
        return U.published(id)
    end
    if existing then return {2, tonumber(existing), false} end
    if broadcast and admin == 0 then return {3, 'not_permitted'} end
    if admin == 0 and sender ~= t[1] then
        if t[2] == 'owner' then return {3, 'not_permitted'} end
        if call('ZSCORE', K.members(topic), sender) == false then
            return {3, 'not_subscribed'}
        end
    end
    local offset = tonumber(t[5]) + 1
    local members
    if broadcast then
        members = {}
        for _, client in ipairs(call('ZRANGE', K.clients, 0, -1)) do
            if U.live(client) then members[#members + 1] = client end
        end
    else
        call('HSET', K.topic(topic), 'lo', offset)
        members = call('ZRANGE', K.members(topic), 0, -1)
    end
    local queued, full = {}, {}
    for _, member in ipairs(members) do
        if member ~= sender then
            if call('ZCARD', K.queue(member)) < max_queued then
                queued[#queued + 1] = member
            else
                full[#full + 1] = member
            end
        end
    end
    local made = #queued + #full
    local row = {'s', sender, 'r', '#' .. topic, 'i', msgid, 'h', high, 'a', ack, 'f', fields,
        'at', accepted_at, 'ex', expires_at, 'nd', made, 'nq', #queued, 'tp', topic,
        'dn', made, 'nf', #full}
    if not broadcast then
        row[#row + 1], row[#row + 2] = 'to', offset
        row[#row + 1], row[#row + 2] = 'ih', 1
    end
    if key_id then row[#row + 1], row[#row + 2] = 'k', key_id end
    if conversation then row[#row + 1], row[#row + 2] = 'cv', conversation end
    if #full > 0 then row[#row + 1], row[#row + 2] = 'n:failed', #full end
    local first = 0
    if made > 0 then
        U.raise_seq(BATCH.top)
        first = call('INCRBY', K.seq, made) - made + 1
        row[#row + 1], row[#row + 2] = 'd0', first
    end
    call('HSET', K.message(id), unpack(row))
    call('HSET', K.sent(sender), msgid, id)
    call('HINCRBY', K.msgids, msgid, 1)
    call('ZADD', K.accepted, accepted_at, U.pad(id))
    U.index_content(id, fields, key_id)
    local seqs = {}
    for i, member in ipairs(queued) do
        seqs[i] = first + i - 1
        U.add_delivery(seqs[i], id, sender, member, msgid, expires_at, 0, false, accepted_at, 0,
            '', conversation, true)
    end
    for i, member in ipairs(full) do
        U.add_delivery(first + #queued + i - 1, id, sender, member, msgid, expires_at, 0,
            'failed', accepted_at, 0, 'queue_full', conversation, true)
    end
    if broadcast then return {1, id, 0, queued, seqs, #full} end
    U.enter_history(id, topic, sender, offset, accepted_at, t[4])
    U.trim(topic, offset - tonumber(t[3]))
    return {1, id, offset, queued, seqs, #full}
end

-- {id, creator, metadata, access, publish, presence, history_count, history_age, created_at,
-- max_owned}
function OPS.create_topic(a)
    local id, creator, metadata, access, publish, presence, count, age, at, max_owned = unpack(a)
    if call('EXISTS', K.topic(id)) == 1 then return 'exists' end
    if call('ZCARD', K.owned(creator)) >= max_owned then return 'too_many' end
    call('HSET', K.topic(id), 'c', creator, 'md', metadata, 'ac', access, 'pb', publish,
        'pr', presence, 'hn', count, 'ha', age, 'ca', at, 'lo', 0)
    call('ZADD', K.topics, 0, id)
    if access == 'open' then call('ZADD', K.open_topics, 0, id) end
    call('ZADD', K.owned(creator), 0, id)
    return 'created'
end

function OPS.get_topic(a)
    return U.topic_row(a[1])
end

-- {viewer or false, everything (0/1), after or false, limit}: topic rows in id order after
-- ``after``: every one, or the open ones and the private ones the viewer subscribes to or owns
-- (read on its subscriptions and its own, at most max_subscriptions and max_owned, up to
-- where the open ones' page ends).
function OPS.list_topics(a)
    local viewer, everything, after, limit = a[1], a[2], a[3], a[4]
    if limit == 0 then return {} end
    local count = limit > 0 and limit or -1  -- as SQL: a negative LIMIT is none
    local index = everything == 1 and K.topics or K.open_topics
    local ids = call('ZRANGEBYLEX', index, U.after(after), '+', 'LIMIT', 0, count)
    if everything == 0 and viewer then
        local stop = '+'
        if #ids == limit then stop = '[' .. ids[#ids] end
        local seen = {}
        for _, index in ipairs({K.subscriptions(viewer), K.owned(viewer)}) do
            local found = 0
            for _, id in ipairs(call('ZRANGEBYLEX', index, U.after(after), stop)) do
                if found == limit then break end
                if not seen[id] and call('HGET', K.topic(id), 'ac') == 'private' then
                    ids[#ids + 1] = id
                    seen[id] = true
                    found = found + 1
                end
            end
        end
        table.sort(ids, U.lt)
    end
    local rows = {}
    for i, id in ipairs(ids) do
        if limit > 0 and i > limit then break end
        rows[i] = U.topic_row(id)
    end
    return rows
end

-- {id, metadata, access, publish, presence, history_count, history_age}, false for each kept:
-- the topic as it is then, or false if there is none. Its history is trimmed to its count at
-- once; a new history_age reschedules its messages' ageing out.
function OPS.update_topic(a)
    local id, metadata, access, publish, presence, count, age = unpack(a)
    local key = K.topic(id)
    if call('EXISTS', key) == 0 then return false end
    local given = {}
    for i, field in ipairs({'md', 'ac', 'pb', 'pr', 'hn', 'ha'}) do
        if a[i + 1] ~= false then given[#given + 1], given[#given + 2] = field, a[i + 1] end
    end
    if #given > 0 then call('HSET', key, unpack(given)) end
    if access == 'open' then
        call('ZADD', K.open_topics, 0, id)
    elseif access then
        call('ZREM', K.open_topics, id)
    end
    if age then
        for _, member in ipairs(call('ZRANGE', K.topic_history(id), 0, -1)) do
            local message = tonumber(member)
            local at = call('HGET', K.message(message), 'at')
            call('ZADD', K.aging, U.ages_out(at, age), U.pad(message))
        end
    end
    local t = call('HMGET', key, 'hn', 'lo')
    U.trim(id, tonumber(t[2]) - tonumber(t[1]))
    return U.topic_row(id)
end

-- Delete a topic, its subscriptions and its history (deliveries of its messages that wait
-- still go out). One call: its members are at most the server's max_subscribers.
function U.forget_topic(id)
    local creator = call('HGET', K.topic(id), 'c')
    if not creator then return false end
    call('DEL', K.topic(id))
    call('ZREM', K.topics, id)
    call('ZREM', K.open_topics, id)
    call('ZREM', K.owned(creator), id)
    for _, member in ipairs(call('ZRANGE', K.members(id), 0, -1)) do
        call('ZREM', K.subscriptions(member), id)
    end
    call('DEL', K.members(id))
    for _, message in ipairs(call('ZRANGE', K.topic_history(id), 0, -1)) do
        U.leave_history(tonumber(message))
    end
    return true
end

function OPS.delete_topic(a)
    return U.forget_topic(a[1]) and 1 or 0
end

-- {topic, client, max_subscribers, max_subscriptions, invited (0/1)}
function OPS.subscribe(a)
    local id, client, max_subscribers, max_subscriptions, invited = unpack(a)
    local access = call('HGET', K.topic(id), 'ac')
    if not access then return 'topic_not_found' end
    if not U.live(client) then return 'unknown_client' end
    if call('ZSCORE', K.members(id), client) then return 'already' end
    if access == 'private' and invited == 0 then return 'private' end
    if call('ZCARD', K.members(id)) >= max_subscribers then return 'topic_full' end
    if call('ZCARD', K.subscriptions(client)) >= max_subscriptions then return 'too_many' end
    call('ZADD', K.members(id), 0, client)
    call('ZADD', K.subscriptions(client), 0, id)
    return 'subscribed'
end

function OPS.unsubscribe(a)
    local id, client = a[1], a[2]
    if call('EXISTS', K.topic(id)) == 0 then return 'topic_not_found' end
    if call('ZREM', K.members(id), client) == 0 then return 'not_subscribed' end
    call('ZREM', K.subscriptions(client), id)
    return 'unsubscribed'
end

function OPS.is_subscribed(a)
    return call('ZSCORE', K.members(a[1]), a[2]) and 1 or 0
end

-- {topic, after or false, limit}: its subscribers in uuid order.
function OPS.topic_subscribers(a)
    if a[3] == 0 then return {} end
    return call('ZRANGEBYLEX', K.members(a[1]), U.after(a[2]), '+', 'LIMIT', 0, a[3])
end

function OPS.client_topics(a)
    return call('ZRANGE', K.subscriptions(a[1]), 0, -1)
end

-- {client}: {topic, presence (1/0)} of each topic it subscribes to, in id order.
function OPS.memberships(a)
    local rows = {}
    for _, topic in ipairs(call('ZRANGE', K.subscriptions(a[1]), 0, -1)) do
        local presence = call('HGET', K.topic(topic), 'pr')
        rows[#rows + 1] = {topic, (presence == '1' or presence == 'true') and 1 or 0}
    end
    return rows
end

-- {topic, since, limit, now}: its history after offset ``since``, oldest first, at most
-- ``limit``, none older than its history_age at ``now`` (purged or not yet): {offset, msgid,
-- sender, fields, key_id, accepted_at, message id, address} each.
function OPS.topic_messages(a)
    local id, since, limit, now = a[1], a[2], a[3], a[4]
    local age = call('HGET', K.topic(id), 'ha')
    if not age or limit == 0 then return {} end
    local oldest = tonumber(now) - tonumber(age)
    local page = limit > 0 and limit or -1
    local rows, from = {}, '(' .. U.int(since)
    while true do
        local flat = call('ZRANGEBYSCORE', K.topic_history(id), from, '+inf', 'WITHSCORES',
            'LIMIT', 0, page)
        for i = 1, #flat, 2 do
            local message = tonumber(flat[i])
            local m = call('HMGET', K.message(message), 'i', 's', 'f', 'k', 'at', 'r')
            if tonumber(m[5]) >= oldest then
                rows[#rows + 1] = {tonumber(flat[i + 1]), m[1], m[2], m[3], m[4], m[5], message,
                    m[6]}
                if #rows == limit then return rows end
            end
        end
        -- Past the aged ones not purged yet, the next page.
        if page < 0 or #flat < 2 * page then return rows end
        from = '(' .. flat[#flat]
    end
end

-- {{id...}}: {id, deliveries, delivered, acknowledged, failed, expired} of each one that is
-- a topic's message.
function OPS.topic_counts(a)
    local rows = {}
    for _, id in ipairs(a[1]) do
        local m = call('HMGET', K.message(id), 'tp', 'nd', 'n:delivered', 'n:acknowledged',
            'n:failed', 'n:expired')
        if m[1] then
            rows[#rows + 1] = {id, tonumber(m[2]), tonumber(m[3] or '0'), tonumber(m[4] or '0'),
                tonumber(m[5] or '0'), tonumber(m[6] or '0')}
        end
    end
    return rows
end

-- A deleted client's subscriptions end (at most max_subscriptions), in its tombstone's call;
-- its messages leave the topics' histories and the topics it owns go after, in the phases of
-- OPS.forget_history (each may be big).
function U.unsubscribe_all(uuid)
    for _, id in ipairs(call('ZRANGE', K.subscriptions(uuid), 0, -1)) do
        call('ZREM', K.members(id), uuid)
    end
    call('DEL', K.subscriptions(uuid))
end

-- The phase of a client's deletion after ``phase`` that has work left: ``tp`` its messages
-- leave the topics' histories, ``to`` the topics it owns go; done once neither has. 1 while
-- more remains, else 0.
function U.forget_next(uuid, phase)
    if phase ~= 'to' and call('ZCARD', K.in_history_by(uuid)) > 0 then
        call('HSET', K.forgetting, uuid, 'tp:0')
        return 1
    end
    if call('ZCARD', K.owned(uuid)) > 0 then
        call('HSET', K.forgetting, uuid, 'to:0')
        return 1
    end
    call('HDEL', K.forgetting, uuid)
    return 0
end

-- A deleted client's topics: ``limit`` of its messages leave their history (phase ``tp``), or
-- one topic it owns goes (``to``: one may have many members).
function U.forget_topics(uuid, phase, limit)
    if phase == 'tp' then
        for _, id in ipairs(call('ZRANGE', K.in_history_by(uuid), 0, limit - 1)) do
            U.leave_history(tonumber(id))
            call('ZREM', K.in_history_by(uuid), id)  -- whatever its state, it is done with
        end
    else
        local owned = call('ZRANGE', K.owned(uuid), 0, 0)
        if owned[1] then U.forget_topic(owned[1]) end
    end
    return U.forget_next(uuid, phase)
end

local APPLY = {
    I = U.insert, F = U.finish, A = U.set_attempts, P = U.set_receipt_pending,
    Q = U.load_queue, R = U.load_receipts, X = U.find_expired, G = U.purge,
    N = U.load_key_notices, C = U.clear_key_notice, M = U.mark_read, T = U.clear_read_pending,
    B = U.publish,
}
-- Each operation's arguments by type, the code first: n a number, s a string, S a string or
-- false, t a list of numbers.
local SIGNATURES = {
    I = 'snsssnnsSssnSnsS', F = 'snssnsnS', A = 'snnS', P = 'stn', Q = 'ssnnn', R = 'ssnn',
    X = 'ssn', G = 'sssnnS', N = 'ssn', C = 'ssssss', M = 'sssSs', T = 'st',
    B = 'snsssnnsSssnS',
}

function U.well_formed(op)
    if type(op) ~= 'table' or type(op[1]) ~= 'string' then return false end
    local signature = SIGNATURES[op[1]]
    if signature == nil or #op ~= #signature then return false end
    for i = 2, #signature do
        local kind, value = string.sub(signature, i, i), op[i]
        if kind == 'n' and type(value) ~= 'number' then return false end
        if kind == 's' and type(value) ~= 'string' then return false end
        if kind == 'S' and value ~= false and type(value) ~= 'string' then return false end
        if kind == 't' then
            if type(value) ~= 'table' then return false end
            for _, item in ipairs(value) do
                if type(item) ~= 'number' then return false end
            end
        end
    end
    return true
end

-- {max_queued, op...}: checked whole before the first write, then applied in order.
function OPS.execute(a)
    local max_queued = a[1]
    if type(max_queued) ~= 'number' then return U.fail('max_queued is a number') end
    local seqs = {}
    for i = 2, #a do
        local op = a[i]
        if not U.well_formed(op) then
            return U.fail('operation ' .. (i - 1) .. ' of the batch is malformed')
        end
        if op[1] == 'I' or op[1] == 'B' then
            local seq = op[2]
            if seq < 1 or seq ~= math.floor(seq) then
                return U.fail('operation ' .. (i - 1) .. ': a seq is a positive integer')
            end
            -- A seq that holds this very message again is a duplicate (a re-sent Insert or
            -- Publish); one that holds another message is a conflict.
            local message = U.lp(op[1] == 'I' and op[3] or op[4]) .. op[5]
            if seqs[seq] == nil then seqs[seq] = U.holder(seq) end
            if (seqs[seq] or message) ~= message then
                return U.fail('message seq ' .. U.int(seq) .. ' holds another message')
            end
            seqs[seq] = message
            -- A Publish takes its deliveries' seqs above every Insert of the batch.
            if op[1] == 'I' then BATCH.top = math.max(BATCH.top, seq) end
        end
    end
    local results = {}
    for i = 2, #a do
        local op = a[i]
        local result = APPLY[op[1]](op, max_queued)
        results[i - 1] = result
    end
    -- The high-water mark, as SQLite's AUTOINCREMENT keeps it: never lowered.
    U.raise_seq(BATCH.high)
    return results
end

-- --- message reads ----------------------------------------------------------------------------

function OPS.last_message_seq(a)
    return tonumber(call('GET', K.seq) or '0')
end

function OPS.reserve_seqs(a)
    return call('INCRBY', K.seq, a[1])
end

-- {since, limit}: the messages accepted since, newest last, each with its first delivery's
-- status; not a topic's (they have no delivery of their own id: SQLite's join leaves them
-- out).
function OPS.recent_messages(a)
    local since, limit = a[1], a[2]
    local ids = {}
    for i, padded in ipairs(call('ZRANGEBYSCORE', K.accepted, since, '+inf')) do
        ids[i] = tonumber(padded)
    end
    table.sort(ids, function(x, y) return x > y end)
    local newest = {}
    for _, id in ipairs(ids) do
        if limit >= 0 and #newest >= limit then break end  -- as SQL: a negative LIMIT is none
        local row = call('HMGET', K.message(id), 's', 'i', 'at', 'tp')
        if not row[4] then
            row[4] = call('HGET', K.delivery(id), 'st')
            newest[#newest + 1] = row
        end
    end
    local rows = {}
    for i = #newest, 1, -1 do rows[#rows + 1] = newest[i] end
    return rows
end

-- The newest delivery ``sender`` sent of its message ``id``: the message's own seq, or for a
-- topic's message, the highest of its deliveries' seqs (d0 .. d0 + dn - 1) still stored (0:
-- none is).
function U.newest_sent(id, sender)
    local m = call('HMGET', K.message(id), 'tp', 'd0', 'dn')
    if not m[1] then return id end
    if not m[2] then return 0 end
    -- The newest of its deliveries still stored (those purged are gone from the top first,
    -- oldest finished first: usually the last one is there).
    for seq = tonumber(m[2]) + tonumber(m[3]) - 1, tonumber(m[2]), -1 do
        if call('EXISTS', K.delivery(seq)) == 1 then return seq end
    end
    return 0
end

-- {msgid, client}: the newest of the message the client sent with that msgid (as its first
-- delivery) and the deliveries it was sent with it.
function OPS.message_record(a)
    local msgid, client = a[1], a[2]
    local best = tonumber(call('HGET', K.sent(client), msgid) or '0')
    if best > 0 then best = U.newest_sent(best, client) end
    local prefix = U.lp(msgid)
    local received = call('ZREVRANGEBYLEX', K.received(client), '[' .. prefix .. '\255',
        '[' .. prefix, 'LIMIT', 0, 1)
    if received[1] then
        local seq = tonumber(string.sub(received[1], #prefix + 1))
        if seq > best then best = seq end
    end
    if best == 0 then return false end
    local d = call('HMGET', K.delivery(best), 'm', 's', 'r', 'st', 'rs', 'n', 'ex', 'fa', 'dv',
        'ra', 'rh')
    local m = call('HMGET', K.message(tonumber(d[1])), 'i', 'at', 'tp')
    local read_at = d[10]
    if d[11] == '1' and d[3] ~= client then read_at = false end  -- hidden from its sender
    -- {seq, sender, recipient, msgid, status, reason, attempts, accepted_at, expires_at,
    -- finished_at, delivered_at, read_at, message id, topic}
    return {best, d[2], d[3], m[1], d[4], d[5], d[6], m[2], d[7], d[8], d[9], read_at,
        tonumber(d[1]), m[3]}
end

-- {client, box, peer, conversation, newest_first, cursor, limit}: a page of the client's
-- history (see HistoryQuery), each entry {seq, sender, recipient, msgid, fields, key_id,
-- conversation, status, reason, attempts, accepted_at, delivered_at, finished_at, message id,
-- address, read_at (false for a sender the reader hid it from)}. Each side (what it received, what it sent) is read on its own index, at most a
-- page of it past the cursor, and the two are merged: a page costs its size.
function OPS.history(a)
    local client, box, peer, conversation, newest_first, cursor, limit = unpack(a)
    if limit == 0 then return {} end
    local sides = {}
    if box ~= 'sent' then sides[#sides + 1] = K.history(peer, client, conversation) end
    if box ~= 'inbox' then
        local key = K.history(client, peer, conversation)
        if key ~= sides[1] then sides[#sides + 1] = key end  -- notes to itself, with itself
    end
    local verb, from, to = 'ZRANGEBYSCORE', '-inf', '+inf'
    if newest_first == 1 then verb, from, to = 'ZREVRANGEBYSCORE', '+inf', '-inf' end
    if cursor then from = '(' .. U.int(cursor) end
    local seqs, seen = {}, {}
    for _, key in ipairs(sides) do
        for _, seq in ipairs(call(verb, key, from, to, 'LIMIT', 0, limit)) do
            seq = tonumber(seq)
            if not seen[seq] then
                seen[seq] = true
                seqs[#seqs + 1] = seq
            end
        end
    end
    if newest_first == 1 then
        table.sort(seqs, function(x, y) return x > y end)
    else
        table.sort(seqs)
    end
    local rows = {}
    for i, seq in ipairs(seqs) do
        if limit > 0 and i > limit then break end  -- as SQL: a negative LIMIT is none
        local d = call('HMGET', K.delivery(seq), 'm', 's', 'r', 'st', 'rs', 'n', 'dv', 'fa', 'ra',
            'rh')
        local id = tonumber(d[1])
        local m = call('HMGET', K.message(id), 'i', 'f', 'k', 'cv', 'at', 'r')
        local read_at = d[9]
        if d[10] == '1' and d[3] ~= client then read_at = false end  -- hidden from its sender
        rows[i] = {seq, d[2], d[3], m[1], m[2], m[3], m[4], d[4], d[5], d[6], m[5], d[7], d[8],
            id, m[6], read_at}
    end
    return rows
end

function OPS.msgid_known(a)
    return call('HEXISTS', K.msgids, a[1])
end

function OPS.undelivered(a)
    local recipient, limit = a[1], a[2]
    local rows = {}
    if limit ~= 0 then
        local stop = limit > 0 and limit - 1 or -1
        for i, seq in ipairs(call('ZRANGE', K.queue(recipient), 0, stop)) do
            rows[i] = U.delivery_row(tonumber(seq))
        end
    end
    return {call('ZCARD', K.queue(recipient)), rows}
end

function OPS.keys_in_use(a)
    local counts = {}
    for _, key_id in ipairs(call('SMEMBERS', K.key_ids)) do
        counts[#counts + 1] = {key_id, call('ZCARD', K.sealed(key_id))}
    end
    local plain = call('ZCARD', K.plain)
    if plain > 0 then counts[#counts + 1] = {false, plain} end
    return counts
end

function OPS.queue_depths(a)
    local depths = {}
    for _, recipient in ipairs(call('SMEMBERS', K.queues)) do
        depths[#depths + 1] = {recipient, call('ZCARD', K.queue(recipient))}
    end
    return depths
end

-- --- opening: the layout's version and its migration, and the keys content needs --------------

-- {version}: the stored layout version (set to ``version`` if there is none yet), and 1 if a
-- migration has yet to finish, else 0.
function OPS.layout(a)
    call('SET', K.schema, U.int(a[1]), 'NX')
    return {tonumber(call('GET', K.schema)), call('EXISTS', K.migration)}
end

function OPS.schema_version(a)
    return tonumber(call('GET', K.schema) or '0')
end

-- Layout 1 kept a message and its one recipient's copy in one hash, m:<seq>; layout 2 splits
-- it into the message (m:<seq>, its id the seq) and its delivery (dl:<seq>), exactly as an
-- Insert of layout 2 would have stored them, and adds the delivery to the history indexes
-- (layout 1 kept no conversation). The other indexes stay as they are: each seq they hold is
-- now both a message's id and its delivery's seq. Layout 1 kept no delivery time: a delivery
-- whose status is delivered was delivered when it finished, as a Finish (or an Insert, final
-- already) of layout 2 would have recorded it; others keep none.
function U.split_message(id)
    local key = K.message(id)
    local row = call('HMGET', key, 's', 'r', 'ex', 'n', 'st', 'rs', 'fa', 'rp')
    local status = row[5]
    local delivery = {'m', id, 's', row[1], 'r', row[2], 'ex', row[3], 'n', row[4],
        'rs', row[6], 'rp', row[8]}
    if status then
        delivery[#delivery + 1], delivery[#delivery + 2] = 'st', status
        delivery[#delivery + 1], delivery[#delivery + 2] = 'fa', row[7]
        if status == 'delivered' then
            delivery[#delivery + 1], delivery[#delivery + 2] = 'dv', row[7]
        end
    end
    call('HSET', K.delivery(id), unpack(delivery))
    U.history_index('ZADD', id, row[1], row[2], false)
    call('HDEL', key, 'n', 'st', 'rs', 'fa', 'rp')
    call('HSET', key, 'nd', 1, 'nq', status and 0 or 1)
end

-- {version, page}: migrate the next ``page`` messages, by rank in ``acc``, from layout 1 to
-- ``version`` (3); returns how many are left (0: done). Layout 3 (topics) only added keys and
-- fields that layout 2 data has none of: from 2, writing the version is all.
--
-- The first call writes the new version, so that an older relayd refuses the data from then
-- on, and the migration's cursor (``schema:migration``: the rank reached); each call moves the
-- cursor, the last deletes it. Each call is atomic: a node killed between two leaves the
-- cursor where the last one put it, and the next node to open goes on from there; two nodes
-- opening at once share the cursor. A message split already (it has its delivery) is skipped,
-- so a cursor that lags can only cost time. No message is stored or forgotten meanwhile: every
-- relayd that knows the new layout migrates before it serves, and one that does not refuses
-- to open.
function OPS.migrate(a)
    local version, page = a[1], a[2]
    local stored = tonumber(call('GET', K.schema) or '0')
    if stored < version then
        if (stored ~= 1 and stored ~= 2) or version ~= 3 then
            return U.fail('no migration from layout ' .. U.int(stored) .. ' to ' .. U.int(version))
        end
        call('SET', K.schema, U.int(version))
        if stored == 1 then call('HSET', K.migration, 'rank', 0) end
    elseif stored > version then
        return U.fail('layout ' .. U.int(stored) .. ' is newer than ' .. U.int(version))
    end
    if call('EXISTS', K.migration) == 0 then return 0 end
    local rank = tonumber(call('HGET', K.migration, 'rank'))
    local ids = call('ZRANGE', K.accepted, rank, rank + page - 1)
    for _, padded in ipairs(ids) do
        local id = tonumber(padded)
        if call('EXISTS', K.delivery(id)) == 0 then U.split_message(id) end
    end
    rank = rank + #ids
    local left = call('ZCARD', K.accepted) - rank
    if left <= 0 then
        call('DEL', K.migration)
        return 0
    end
    call('HSET', K.migration, 'rank', rank)
    return left
end

-- The first message sealed under each key in use (what the store's keys must decrypt).
function OPS.first_sealed(a)
    local rows = {}
    for _, key_id in ipairs(call('SMEMBERS', K.key_ids)) do
        local first = call('ZRANGE', K.sealed(key_id), 0, 0)
        if first[1] then rows[#rows + 1] = U.content_row(tonumber(first[1])) end
    end
    return rows
end

function OPS.plain_rows(a)
    local rows = {}
    for i, id in ipairs(call('ZRANGE', K.plain, 0, a[1] - 1)) do
        rows[i] = U.content_row(tonumber(id))
    end
    return rows
end

-- {{id, key_id, blob}...}: messages sealed in Python replace their plain text, unless they
-- have changed since (final: emptied; sealed already).
function OPS.seal(a)
    local sealed = 0
    for _, entry in ipairs(a) do
        local id, key_id, blob = entry[1], entry[2], entry[3]
        local key = K.message(id)
        local row = call('HMGET', key, 'f', 'k')
        call('ZREM', K.plain, id)
        if row[1] and row[1] ~= '' and row[2] == false then
            call('HSET', key, 'f', blob, 'k', key_id)
            U.index_content(id, blob, key_id)
            sealed = sealed + 1
        end
    end
    return sealed
end

local op = OPS[ARGV[2]]
if op == nil then return U.fail('unknown operation ' .. tostring(ARGV[2])) end
local result = op(mp_unpack(ARGV[3]))
U.reconcile()
return result
