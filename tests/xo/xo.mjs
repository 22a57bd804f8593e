// Xen Orchestra's qcow2 code (@xen-orchestra/qcow2) as a client of
// xapi-qcow-tool, driven by tests/xo_test.go. Three verbs:
//
//   read FD OUT   QcowStream reads the qcow2 stream on descriptor FD (a
//                 pipe) forward only, as XO reads GET /export_raw_vdi, and
//                 writes every block it finds into the raw file OUT (made
//                 the virtual size; for a diff, OUT is a copy of the base).
//                 Prints {"virtualSize","clusterSize","blocks"}.
//   tables FD     Reads the header and tables only, then closes (destroys)
//                 the stream, as XO's NBD backups do. Prints the same
//                 object and "closed", and stays alive until stdin ends,
//                 so that the pipe is closed by close(), not by our exit.
//   write RAW     toQcow2Stream of the raw file RAW, as XO writes
//                 PUT /import_raw_vdi?format=qcow2, onto stdout. The disk
//                 is sparse: only 64 KiB blocks holding a non-zero byte
//                 are allocated; the last block is short when RAW's size
//                 is not a multiple of 64 KiB.
import { QcowStream, toQcow2Stream } from '@xen-orchestra/qcow2'
import { RandomAccessDisk } from '@xen-orchestra/disk-transform'
import fs from 'node:fs/promises'
import net from 'node:net'
import { pipeline } from 'node:stream/promises'

const BLOCK = 64 * 1024

// The stream on descriptor fd, read as a socket (XO reads an HTTP
// response): closing it closes the descriptor.
function streamOn(fd) {
  return new net.Socket({ fd: Number(fd), readable: true, writable: false })
}

async function openQcow(fd) {
  const disk = new QcowStream(streamOn(fd))
  await disk.init()
  return {
    disk,
    summary: {
      virtualSize: disk.getVirtualSize(),
      clusterSize: disk.getBlockSize(),
      blocks: disk.getBlockIndexesCount(),
    },
  }
}

async function read(fd, out) {
  const { disk, summary } = await openQcow(fd)
  const size = summary.virtualSize
  const file = await fs.open(out, 'r+')
  try {
    if ((await file.stat()).size < size) {
      await file.truncate(size)
    }
    // diskBlocks: every allocated block, in L2 order (readBlock each), then
    // close() — the forward-only read XO does.
    for await (const { index, data } of disk.diskBlocks()) {
      const off = index * summary.clusterSize
      const n = Math.min(data.length, size - off)
      await file.write(data, 0, n, off)
    }
  } finally {
    await file.close()
  }
  console.log(JSON.stringify(summary))
}

async function tables(fd) {
  const { disk, summary } = await openQcow(fd)
  console.log(JSON.stringify(summary))
  await disk.close()
  console.log('closed')
  process.stdin.resume()
  await new Promise(resolve => process.stdin.on('end', resolve))
}

// SparseRawDisk is a raw file as a RandomAccessDisk with 64 KiB blocks,
// allocated where they hold a non-zero byte.
class SparseRawDisk extends RandomAccessDisk {
  #path
  #file
  #size = 0
  #blocks = []
  constructor(path) {
    super()
    this.#path = path
  }
  async init() {
    this.#file = await fs.open(this.#path, 'r')
    this.#size = (await this.#file.stat()).size
    const buf = Buffer.alloc(BLOCK)
    for (let i = 0; i * BLOCK < this.#size; i++) {
      const { bytesRead } = await this.#file.read(buf, 0, BLOCK, i * BLOCK)
      if (buf.subarray(0, bytesRead).some(b => b !== 0)) {
        this.#blocks.push(i)
      }
    }
  }
  getVirtualSize() {
    return this.#size
  }
  getBlockSize() {
    return BLOCK
  }
  isDifferencing() {
    return false
  }
  getBlockIndexes() {
    return this.#blocks
  }
  hasBlock(index) {
    return this.#blocks.includes(index)
  }
  async readBlock(index) {
    const n = Math.min(BLOCK, this.#size - index * BLOCK)
    const data = Buffer.alloc(n)
    await this.#file.read(data, 0, n, index * BLOCK)
    return { index, data }
  }
  async close() {
    await this.#file?.close()
    this.#file = undefined
  }
}

async function write(raw) {
  const disk = new SparseRawDisk(raw)
  await disk.init()
  await pipeline(toQcow2Stream(disk), process.stdout)
}

const [verb, ...args] = process.argv.slice(2)
const verbs = { read, tables, write }
if (!(verb in verbs)) {
  console.error(`usage: node xo.mjs read FD OUT | tables FD | write RAW`)
  process.exit(2)
}
try {
  await verbs[verb](...args)
} catch (error) {
  console.error(`xo ${verb}: ${error?.stack ?? error}`)
  process.exit(1)
}
