package wrapper

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"github.com/coreos/go-systemd/v22/journal"
)

// newJournalHandler returns a handler that sends records to the systemd
// journal as structured entries, or nil when there is no journal socket.
// Every entry carries SYSLOG_IDENTIFIER and the command (COMMAND), so that
// `journalctl -t xapi-qcow-tool COMMAND=stream` finds a run.
func newJournalHandler(args []string) slog.Handler {
	if !journal.Enabled() {
		return nil
	}
	level := slog.LevelInfo
	for _, a := range args {
		if a == "--debug" || a == "-v" || a == "--verbose" {
			level = slog.LevelDebug
		}
	}
	fields := map[string]string{"SYSLOG_IDENTIFIER": Name}
	if cmd := commandName(args); cmd != Name {
		fields["COMMAND"] = cmd
	}
	return &journalHandler{level: level, fields: fields, send: journal.Send}
}

// journalHandler is a slog.Handler writing to the journal's native
// protocol. Attribute keys become field names: upper case, with anything
// but A-Z, 0-9 and _ replaced by _, groups joined by _.
type journalHandler struct {
	level  slog.Level
	fields map[string]string // fixed fields and attributes from With
	prefix string            // open groups, as FIELD_ prefixes
	send   func(msg string, p journal.Priority, vars map[string]string) error
}

func (h *journalHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level }

func (h *journalHandler) Handle(_ context.Context, r slog.Record) error {
	vars := make(map[string]string, len(h.fields)+r.NumAttrs())
	r.Attrs(func(a slog.Attr) bool {
		addAttr(vars, h.prefix, a)
		return true
	})
	// The handler's fields win: COMMAND stays the command's name even
	// when a record names it with its arguments.
	for k, v := range h.fields {
		vars[k] = v
	}
	// A failure to log must not fail the command: the journal may have
	// gone away (or be full), stderr still has the error line.
	_ = h.send(r.Message, priority(r.Level), vars)
	return nil
}

func (h *journalHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	n := *h
	n.fields = make(map[string]string, len(h.fields)+len(attrs))
	for k, v := range h.fields {
		n.fields[k] = v
	}
	for _, a := range attrs {
		addAttr(n.fields, h.prefix, a)
	}
	return &n
}

func (h *journalHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	n := *h
	n.prefix = h.prefix + fieldName(name) + "_"
	return &n
}

func addAttr(vars map[string]string, prefix string, a slog.Attr) {
	v := a.Value.Resolve()
	if v.Kind() == slog.KindGroup {
		p := prefix
		if a.Key != "" {
			p += fieldName(a.Key) + "_"
		}
		for _, g := range v.Group() {
			addAttr(vars, p, g)
		}
		return
	}
	if a.Key == "" {
		return
	}
	vars[prefix+fieldName(a.Key)] = fmt.Sprint(v.Any())
}

// fieldName makes a journal field name of a key: journald accepts only
// upper-case letters, digits and underscores, not starting with an
// underscore (those are trusted fields) nor a digit.
func fieldName(key string) string {
	var b strings.Builder
	for _, c := range strings.ToUpper(key) {
		if c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' {
			b.WriteRune(c)
		} else {
			b.WriteByte('_')
		}
	}
	s := strings.TrimLeft(b.String(), "_")
	if s == "" || s[0] >= '0' && s[0] <= '9' {
		s = "F_" + s
	}
	return s
}

// LevelNotice is syslog's notice (journal priority 5) for slog: normal but
// significant, such as a client that hung up on an export.
const LevelNotice = slog.LevelInfo + 2

// levelNames prints LevelNotice as NOTICE in the verbose stderr log.
func levelNames(_ []string, a slog.Attr) slog.Attr {
	if a.Key == slog.LevelKey && a.Value.Any() == LevelNotice {
		a.Value = slog.StringValue("NOTICE")
	}
	return a
}

func priority(l slog.Level) journal.Priority {
	switch {
	case l >= slog.LevelError:
		return journal.PriErr
	case l >= slog.LevelWarn:
		return journal.PriWarning
	case l >= LevelNotice:
		return journal.PriNotice
	case l >= slog.LevelInfo:
		return journal.PriInfo
	}
	return journal.PriDebug
}
