// Package wrapper is what xapi sees: the command lines it runs (including
// the drop-in names qcow2-to-stdout and qcow-stream-tool), the exit status,
// the one-line error text that becomes a VDI_IO_ERROR, signal handling and
// logging to the systemd journal.
package wrapper

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/alecthomas/kong"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
)

// Name is the program name used in messages and as the journal's
// SYSLOG_IDENTIFIER.
const Name = "xapi-qcow-tool"

// Version is stamped at build time (-ldflags -X).
var Version = "dev"

// Main runs the program with argv and returns the exit status.
func Main(argv []string) int {
	// Writes to a closed stdout must come back as EPIPE, not kill us with
	// SIGPIPE: we say what happened and exit non-zero.
	signal.Ignore(syscall.SIGPIPE)
	// The collector works before any cap is near (vhdcompat/memlimit.go).
	vhdcompat.SetMemoryLimit()
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s, ok := <-sigs
		if ok {
			cancel(fmt.Errorf("received %s", signalName(s)))
		}
	}()
	env := &vhdcompat.Env{Ctx: ctx, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	return Run(env, argv)
}

func signalName(s os.Signal) string {
	switch s {
	case syscall.SIGTERM:
		return "SIGTERM"
	case syscall.SIGINT:
		return "SIGINT"
	}
	return s.String()
}

// Run dispatches on the name the program was started under, then parses
// the command line and runs the command.
func Run(env *vhdcompat.Env, argv []string) int {
	base := filepath.Base(argv[0])
	args := argv[1:]
	switch base {
	case "qcow2-to-stdout", "qcow2-to-stdout.py":
		args = append([]string{"qcow2-to-stdout"}, args...)
	case "qcow-stream-tool":
		// qcow-stream-tool's own command line: stream_decode PATH.
	}
	logger, closeLog := newLogger(env, args)
	defer closeLog()
	env.Log = logger
	done := make(chan int, 1)
	go func() { done <- guarded(env, func() int { return run(env, args) }) }()
	select {
	case code := <-done:
		return code
	case <-env.Ctx.Done():
	}
	// A signal: the command stops at its next check of the context, but a
	// write to a pipe nobody reads (or a read from a silent socket) blocks
	// in the kernel and is restarted after the signal. Give the command a
	// moment to stop cleanly, then end the run ourselves.
	select {
	case code := <-done:
		return code
	case <-time.After(signalGrace):
		code := fail(env, fmt.Errorf("%s: interrupted: %w", commandName(args), context.Cause(env.Ctx)), 1)
		exiting.Store(true)
		return code
	}
}

// guarded runs f and turns a panic into the one-line error and exit
// status 1 that xapi expects: a panic is a bug, and the journal gets the
// stack for the bug report.
func guarded(env *vhdcompat.Env, f func() int) (code int) {
	defer func() {
		if r := recover(); r != nil {
			env.Log.Error("panic", "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			code = fail(env, fmt.Errorf("internal error (a bug: please report it with the journal entry): %v", r), 1)
		}
	}()
	return f()
}

// signalGrace is how long a command may take to stop after SIGTERM or
// SIGINT before the run is ended without it.
const signalGrace = time.Second

// exiting is set once a run ended by a signal has printed its error line,
// so that the command, still running until the process exits, cannot print
// a second one.
var exiting atomic.Bool

// commandName is the command a command line runs, for messages.
func commandName(args []string) string {
	for _, a := range args {
		if !strings.HasPrefix(a, "-") {
			return a
		}
	}
	return Name
}

func run(env *vhdcompat.Env, args []string) int {
	cli := &CLI{}
	exitCode := -1
	parser, err := kong.New(cli,
		kong.Name(Name),
		kong.Description("Moves virtual disks between raw storage and qcow2 streams, for XenServer / XCP-ng."),
		kong.UsageOnError(),
		kong.Vars{"version": Version},
		kong.Writers(env.Stdout, env.Stderr),
		kong.Exit(func(code int) { exitCode = code; panic(exitSignal{}) }),
		kong.Bind(env),
		kong.ConfigureHelp(kong.HelpOptions{Compact: true}),
	)
	if err != nil {
		return fail(env, fmt.Errorf("internal error: %w", err), 1)
	}
	var kctx *kong.Context
	func() {
		defer func() {
			if r := recover(); r != nil {
				if _, ok := r.(exitSignal); !ok {
					panic(r)
				}
			}
		}()
		kctx, err = parser.Parse(args)
	}()
	if exitCode >= 0 {
		return exitCode // --help, --version
	}
	if err != nil {
		return fail(env, usageText(err), 2)
	}
	start := time.Now()
	env.Log.Info("started", "command", kctx.Command(), "args", strings.Join(args, " "))
	err = kctx.Run(env)
	if err == nil {
		env.Log.Info("finished", "command", kctx.Command(), "exit_status", 0, "elapsed_ms", time.Since(start).Milliseconds())
		return 0
	}
	var ue *vhdcompat.UsageError
	if errors.As(err, &ue) {
		return fail(env, err, 2)
	}
	var ee *vhdcompat.ExitError
	if errors.As(err, &ee) {
		if ee.Err != nil {
			return fail(env, ee.Err, ee.Code)
		}
		return ee.Code
	}
	return fail(env, err, 1)
}

type exitSignal struct{}

func usageText(err error) error {
	return &vhdcompat.UsageError{Msg: err.Error() + " (see --help)"}
}

// fail prints the one line xapi shows the API client, logs it at error
// priority — or notice when the client hung up on an export, its own
// choice and no fault of the storage — and returns code.
func fail(env *vhdcompat.Env, err error, code int) int {
	msg := OneLine(err.Error())
	if exiting.Load() {
		return code // the run already ended with its one line
	}
	fmt.Fprintf(env.Stderr, "%s: %s\n", Name, msg)
	if env.Log != nil {
		level := slog.LevelError
		var gone *vhdcompat.ClientGoneError
		if errors.As(err, &gone) {
			level = LevelNotice
		}
		env.Log.Log(context.Background(), level, msg, "exit_status", code)
	}
	return code
}

// OneLine folds a message to a single line.
func OneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}

// newLogger returns the journal logger (see journal.go); stderr gets
// failures only, from fail, unless -v asks for more.
func newLogger(env *vhdcompat.Env, args []string) (*slog.Logger, func()) {
	var handlers []slog.Handler
	if h := newJournalHandler(args); h != nil {
		handlers = append(handlers, h)
	}
	for _, a := range args {
		if a == "-v" || a == "--verbose" || a == "--debug" {
			handlers = append(handlers, slog.NewTextHandler(stderrNoErrors{env.Stderr}, &slog.HandlerOptions{Level: slog.LevelDebug, ReplaceAttr: levelNames}))
			break
		}
	}
	if len(handlers) == 0 {
		return slog.New(slog.DiscardHandler), func() {}
	}
	return slog.New(slog.NewMultiHandler(handlers...)), func() {}
}

// stderrNoErrors drops fail's records (error, and notice for a client
// that hung up) from the verbose stderr log: fail already printed the
// line, and xapi reads stderr as the message.
type stderrNoErrors struct{ w io.Writer }

func (s stderrNoErrors) Write(p []byte) (int, error) {
	if strings.Contains(string(p), "level=ERROR") || strings.Contains(string(p), "level=NOTICE") {
		return len(p), nil
	}
	return s.w.Write(p)
}
