package nbd

// Values of the NBD protocol (NetworkBlockDevice/nbd, doc/proto.md), the
// part this client speaks: the fixed newstyle handshake, NBD_OPT_GO,
// structured replies, metadata contexts and NBD_CMD_BLOCK_STATUS.
const (
	magicInit   = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt    = 0x49484156454f5054 // "IHAVEOPT": newstyle
	magicOld    = 0x00420281861253   // oldstyle negotiation
	magicReply  = 0x3e889045565a9    // option replies
	magicReq    = 0x25609513         // transmission requests
	magicSimple = 0x67446698         // simple replies
	magicChunk  = 0x668e33ef         // structured reply chunks

	// Handshake flags (server) and client flags.
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	optAbort           = 2
	optGo              = 7
	optStructuredReply = 8
	optSetMetaContext  = 10

	repAck         = 1
	repInfo        = 3
	repMetaContext = 4
	repErrBit      = 1 << 31

	infoExport    = 0
	infoBlockSize = 3

	cmdDisc        = 2
	cmdBlockStatus = 7

	chunkFlagDone = 1 << 0

	chunkNone        = 0
	chunkBlockStatus = 5
	chunkErrBit      = 1 << 15
	chunkErrorOffset = chunkErrBit + 2

	// MetaContext is the one metadata context this client selects.
	MetaContext = "base:allocation"
)

// Status flags of the base:allocation context.
const (
	StateHole = 1 << 0 // no storage is allocated for the extent
	StateZero = 1 << 1 // the extent reads as zeros
)

// Bounds on what a server may make this client hold or wait for. Every
// length a server sends is checked against one of them before it is used.
const (
	// maxString is the protocol's bound on a string (export names,
	// context names, error messages).
	maxString = 4096
	// maxOptionReply bounds an option reply's payload: the largest one
	// this client can be sent is an info reply carrying a string.
	maxOptionReply = maxString + 64
	// maxOptionReplies bounds the replies to one option (a server sends
	// one per selected context or requested info, then an ack).
	maxOptionReplies = 64
	// maxExtentsPerChunk is the protocol's bound on the descriptors of
	// one block status chunk (2^20: 8 MiB of payload).
	maxExtentsPerChunk = 1 << 20
	// maxChunks bounds the chunks of one reply: a block status reply is
	// one status chunk, a few error chunks, at most one final empty chunk.
	maxChunks = 32
	// maxMinBlock is the largest minimum block size a server may
	// advertise.
	maxMinBlock = 64 << 10
)

// Window is the most a single block status request asks for: 1 GiB, as
// vhd-tool's nbdhybrid source does. The protocol lets a server answer
// block status beyond its maximum payload size (doc/proto.md, "Size
// constraints"), which bounds read and write payloads only.
const Window = 1 << 30

// MaxPieces bounds the work of one walk over an export: requests plus the
// extents the server reports. A server that describes a disk in more
// pieces than this (134 million: over 500 MiB of replies) is refused
// rather than followed for ever.
const MaxPieces = 1 << 27
