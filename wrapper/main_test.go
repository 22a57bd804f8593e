package wrapper

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
)

func testEnv(t *testing.T) (*vhdcompat.Env, *os.File) {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "stderr")
	if err != nil {
		t.Fatal(err)
	}
	return &vhdcompat.Env{Ctx: context.Background(), Stderr: f, Log: slog.New(slog.DiscardHandler)}, f
}

func TestGuardedTurnsPanicIntoOneLine(t *testing.T) {
	env, stderr := testEnv(t)
	code := guarded(env, func() int { panic("boom") })
	if code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	b, _ := os.ReadFile(stderr.Name())
	if strings.Count(string(b), "\n") != 1 || !strings.HasPrefix(string(b), Name+": internal error") || !strings.Contains(string(b), "boom") {
		t.Fatalf("stderr %q", b)
	}
	if code := guarded(env, func() int { return 3 }); code != 3 {
		t.Fatalf("guarded changed a normal exit status to %d", code)
	}
}

func TestOneLine(t *testing.T) {
	if got := OneLine("a\n  b\tc\n"); got != "a b c" {
		t.Fatalf("OneLine = %q", got)
	}
}
