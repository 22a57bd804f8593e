package wrapper

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"syscall"
	"testing"

	"github.com/coreos/go-systemd/v22/journal"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
)

// TestFailClientGoneIsNotice: a client that hangs up on an export is
// logged at notice priority, any other failure at error; both print one
// line and keep their exit status.
func TestFailClientGoneIsNotice(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want journal.Priority
	}{
		{&vhdcompat.ClientGoneError{Source: "d", Out: "stdout", Err: syscall.EPIPE}, journal.PriNotice},
		{fmt.Errorf("stream: %w", &vhdcompat.ClientGoneError{Source: "d", Out: "fd 5", Err: syscall.ECONNRESET}), journal.PriNotice},
		{errors.New("import from stdin into d: write at offset 0: input/output error"), journal.PriErr},
	} {
		env, stderr := testEnv(t)
		var got []journal.Priority
		h := &journalHandler{level: slog.LevelDebug, fields: map[string]string{}, send: func(_ string, p journal.Priority, _ map[string]string) error {
			got = append(got, p)
			return nil
		}}
		env.Log = slog.New(h)
		if code := fail(env, tc.err, 1); code != 1 {
			t.Fatalf("exit %d", code)
		}
		if len(got) != 1 || got[0] != tc.want {
			t.Errorf("%v: journal priorities %v, want [%d]", tc.err, got, tc.want)
		}
		if b, _ := os.ReadFile(stderr.Name()); len(b) == 0 {
			t.Errorf("%v: nothing on stderr", tc.err)
		}
	}
}
