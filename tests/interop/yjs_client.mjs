// A stock Yjs client (yjs + the y-websocket provider + ws) that a test drives.
//
// One WebsocketProvider per process, with disableBc: true, so nothing reaches it except
// through the server. Configuration comes from the environment:
//   YJS_SERVER_URL  ws://HOST:PORT/ws/docs
//   YJS_ROOM        ROOM_ID + "/" + DOC_NAME  (the provider's room name)
//   YJS_TOKEN       a room token (sent as ?token=)
//
// stdin: one JSON command a line, each with a "seq" that its reply repeats.
// stdout: one JSON object a line, either a reply {"reply": seq, "ok": true, "result": ...}
// ({"ok": false, "error": "..."} on failure) or an event {"event": NAME, ...}:
//   ready {clientID}; status {status}; sync {synced, activities} (the activities as the
//   document holds them at that moment); connection-close {code, reason};
//   connection-error {message}; closed {code, reason} (the provider gave up);
//   denied {reason} (the server's auth message [2, 0, reason]); update {remote, bytes};
//   awareness {added, updated, removed} (changes from others).
//
// Commands:
//   {"cmd":"info"}                                  → {clientID, status, synced}
//   {"cmd":"add","activity":{"id":..,...}}          append a Y.Map to `activities`
//   {"cmd":"set","id":..,"key":..,"value":..}       set a field of the activity with that id
//   {"cmd":"meta","key":..,"value":..}              set a key of `meta`
//   {"cmd":"state"}                                 → {activities, meta} as JSON
//   {"cmd":"synced","timeout_ms":N}                 wait until the provider is synced
//   {"cmd":"awareness","state":{...}|null}          set the local awareness state
//   {"cmd":"peers"}                                 → {clientID: state} of the others
//   {"cmd":"quit"}                                  destroy the provider (it announces its
//                                                   awareness as removed), close, exit 0
//
// Integers that arrive as BigInt (another client wrote a 64-bit integer) are reported as
// {"$bigint": "123"} so a test can tell them apart from plain numbers.

import * as Y from 'yjs'
import { WebsocketProvider, messageAuth } from 'y-websocket'
import WebSocket from 'ws'
import readline from 'node:readline'

const serverUrl = process.env.YJS_SERVER_URL
const roomname = process.env.YJS_ROOM
const token = process.env.YJS_TOKEN
if (!serverUrl || !roomname || !token) {
  process.stderr.write('YJS_SERVER_URL, YJS_ROOM and YJS_TOKEN are required\n')
  process.exit(2)
}

const toJSON = (value) =>
  JSON.stringify(value, (_key, v) => (typeof v === 'bigint' ? { $bigint: v.toString() } : v))

const out = (obj) => process.stdout.write(toJSON(obj) + '\n')

const ydoc = new Y.Doc()
const activities = ydoc.getArray('activities')
const meta = ydoc.getMap('meta')

const provider = new WebsocketProvider(serverUrl, roomname, ydoc, {
  params: { token },
  WebSocketPolyfill: WebSocket,
  disableBc: true
})

let status = 'connecting'
provider.on('status', ({ status: s }) => {
  status = s
  out({ event: 'status', status: s })
})
provider.on('sync', (synced) => out({ event: 'sync', synced, activities: activities.toJSON() }))
provider.on('connection-close', (event) =>
  out({ event: 'connection-close', code: event ? event.code : null, reason: event ? event.reason : null })
)
provider.on('connection-error', (event) =>
  out({ event: 'connection-error', message: String((event && event.message) || event) })
)
provider.on('closed', ({ code, reason }) => out({ event: 'closed', code, reason }))

// Report the server's auth message, then let the provider's own handler run. The frame
// is peeked, not consumed: [2, varUint(0 = permission denied), varString(reason)].
const authHandler = provider.messageHandlers[messageAuth]
provider.messageHandlers[messageAuth] = (encoder, decoder, prov, emitSynced, type) => {
  try {
    const bytes = decoder.arr
    let pos = decoder.pos
    const readVarUint = () => {
      let num = 0
      let mult = 1
      for (;;) {
        const b = bytes[pos++]
        num += (b & 0x7f) * mult
        mult *= 128
        if (b < 0x80) return num
      }
    }
    const kind = readVarUint()
    const len = readVarUint()
    const reason = new TextDecoder().decode(bytes.subarray(pos, pos + len))
    out({ event: 'denied', kind, reason })
  } catch (err) {
    out({ event: 'denied', kind: null, reason: null, error: String(err) })
  }
  authHandler(encoder, decoder, prov, emitSynced, type)
}

ydoc.on('update', (update, origin) => out({ event: 'update', remote: origin === provider, bytes: update.length }))

provider.awareness.on('change', ({ added, updated, removed }, origin) => {
  if (origin === 'local') return
  out({ event: 'awareness', added, updated, removed })
})

const findActivity = (id) => {
  for (const item of activities.toArray()) {
    if (item instanceof Y.Map && item.get('id') === id) return item
  }
  throw new Error(`no activity ${id}`)
}

const waitSynced = (timeoutMs) =>
  new Promise((resolve, reject) => {
    if (provider.synced) return resolve(true)
    const timer = setTimeout(() => {
      provider.off('sync', onSync)
      reject(new Error(`not synced after ${timeoutMs} ms`))
    }, timeoutMs)
    const onSync = (synced) => {
      if (!synced) return
      clearTimeout(timer)
      provider.off('sync', onSync)
      resolve(true)
    }
    provider.on('sync', onSync)
  })

const quit = async () => {
  const sock = provider.ws
  const closed = new Promise((resolve) => {
    if (!sock || sock.readyState === WebSocket.CLOSED) return resolve()
    const timer = setTimeout(resolve, 2000)
    sock.once('close', () => {
      clearTimeout(timer)
      resolve()
    })
  })
  provider.destroy() // sends the local awareness state as null, then closes the socket
  await closed
}

const commands = {
  info: () => ({ clientID: ydoc.clientID, status, synced: provider.synced }),
  add: ({ activity }) => {
    ydoc.transact(() => {
      const entry = new Y.Map()
      for (const [key, value] of Object.entries(activity)) entry.set(key, value)
      activities.push([entry])
    })
    return null
  },
  set: ({ id, key, value }) => {
    ydoc.transact(() => findActivity(id).set(key, value))
    return null
  },
  meta: ({ key, value }) => {
    meta.set(key, value)
    return null
  },
  state: () => ({ activities: activities.toJSON(), meta: meta.toJSON() }),
  synced: ({ timeout_ms: timeoutMs = 10000 }) => waitSynced(timeoutMs),
  awareness: ({ state }) => {
    provider.awareness.setLocalState(state)
    return null
  },
  peers: () => {
    const peers = {}
    for (const [clientID, state] of provider.awareness.getStates()) {
      if (clientID !== ydoc.clientID) peers[clientID] = state
    }
    return peers
  },
  quit: async () => {
    await quit()
    return null
  }
}

const handle = async (line) => {
  let msg
  try {
    msg = JSON.parse(line)
  } catch (err) {
    out({ event: 'bad-command', line, error: String(err) })
    return
  }
  const command = commands[msg.cmd]
  try {
    if (!command) throw new Error(`unknown command ${msg.cmd}`)
    const result = await command(msg)
    out({ reply: msg.seq, ok: true, result })
  } catch (err) {
    out({ reply: msg.seq, ok: false, error: String(err && err.message ? err.message : err) })
  }
  if (msg.cmd === 'quit') process.exit(0)
}

const lines = readline.createInterface({ input: process.stdin })
lines.on('line', (line) => {
  if (line.trim()) handle(line)
})
lines.on('close', async () => {
  // stdin closed: the test is gone; leave as a closing client would.
  await quit()
  process.exit(0)
})

out({ event: 'ready', clientID: ydoc.clientID })
