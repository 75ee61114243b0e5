// leakydemo: a Go program that leaks TCP sockets on purpose, for tcptrace's
// kernel tests and `tcptrace demo`.
//
//	leakydemo server --listen 127.0.0.1:0 [--hold 10s] [--max-conns 10000]
//	leakydemo client --addr 127.0.0.1:PORT --leak N --ok M [--hold 10s]
//	                 [--close-leaked-after 0s]
//
// The server accepts connections (in main.serveLeaky); each one is handed to
// a goroutine running main.handleLeaky, which reads until EOF and then never
// closes the connection, so it sits in CLOSE_WAIT once the client is gone.
//
// The client dials N connections in main.leakyDial and keeps them open, then
// M connections in main.properDial which are closed (defer conn.Close()).
//
// Only loopback addresses are accepted. Each mode prints exactly one line
// `READY <json>` on stdout once its sockets are set up, then holds until the
// hold time ends or SIGTERM/SIGINT arrives, and exits 0. Only the standard
// library is used. Build with a plain `go build` (no -ldflags "-s -w") so the
// symbols and DWARF stay and frame pointers let user stacks be walked.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"
)

const (
	maxHold       = 10 * time.Minute
	maxConns      = 10000
	setupTimeout  = 30 * time.Second
	dialTimeout   = 5 * time.Second
	exitUsage     = 2
	exitRuntime   = 1
	defaultHold   = 10 * time.Second
	serverMaxConn = 10000
)

// durationFlag accepts Go durations ("10s", "500ms") or plain seconds ("2.5").
type durationFlag struct{ d time.Duration }

func (f *durationFlag) String() string { return f.d.String() }

func (f *durationFlag) Set(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil {
		secs, ferr := strconv.ParseFloat(s, 64)
		if ferr != nil {
			return fmt.Errorf("bad duration %q (use e.g. 10s, 500ms or 2.5)", s)
		}
		d = time.Duration(secs * float64(time.Second))
	}
	if d < 0 {
		return fmt.Errorf("duration %q is negative", s)
	}
	if d > maxHold {
		return fmt.Errorf("duration %q is above the maximum of %s", s, maxHold)
	}
	f.d = d
	return nil
}

var (
	keptMu sync.Mutex
	// kept references every connection we deliberately leave open, so the
	// garbage collector's finalizer on the netFD never closes it behind our back.
	kept []net.Conn
)

func keep(c net.Conn) {
	keptMu.Lock()
	kept = append(kept, c)
	keptMu.Unlock()
}

func fail(code int, format string, args ...interface{}) int {
	fmt.Fprintf(os.Stderr, "leakydemo: "+format+"\n", args...)
	return code
}

func printLine(tag string, v interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	// os.Stdout is unbuffered: the line is written (flushed) right away.
	fmt.Fprintf(os.Stdout, "%s %s\n", tag, b)
}

// checkLoopback accepts only literal loopback addresses "127.0.0.1:P", "[::1]:P".
func checkLoopback(addr string) (host string, port int, err error) {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	ip := net.ParseIP(h)
	if ip == nil || !ip.IsLoopback() {
		return "", 0, fmt.Errorf("%q is not a literal loopback address", addr)
	}
	port, err = strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("bad port in %q", addr)
	}
	return h, port, nil
}

func tcpPort(a net.Addr) int {
	if t, ok := a.(*net.TCPAddr); ok {
		return t.Port
	}
	return 0
}

// hold blocks until the hold time is over or a termination signal arrives.
func hold(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// handleLeaky reads from the connection until EOF (or an error) and then
// returns WITHOUT closing it: the bug tcptrace is meant to find.
//
//go:noinline
func handleLeaky(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		if _, err := c.Read(buf); err != nil {
			if !errors.Is(err, io.EOF) {
				fmt.Fprintf(os.Stderr, "leakydemo: read: %v\n", err)
			}
			return // no c.Close(): the socket stays in CLOSE_WAIT
		}
	}
}

// serveLeaky is the accept loop; accept4() runs on this goroutine.
//
//go:noinline
func serveLeaky(ln net.Listener, max int) {
	for i := 0; i < max; i++ {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		keep(c)
		go handleLeaky(c)
	}
}

// leakyDial dials n connections and keeps every one of them open.
//
//go:noinline
func leakyDial(ctx context.Context, addr string, n int) ([]net.Conn, error) {
	d := net.Dialer{Timeout: dialTimeout}
	conns := make([]net.Conn, 0, n)
	for i := 0; i < n; i++ {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return conns, err
		}
		keep(c)
		conns = append(conns, c)
	}
	return conns, nil
}

// properDial dials m connections and closes each of them (deferred close),
// the correct pattern; tcptrace must not report these.
//
//go:noinline
func properDial(ctx context.Context, addr string, m int) ([]int, error) {
	d := net.Dialer{Timeout: dialTimeout}
	ports := make([]int, 0, m)
	for i := 0; i < m; i++ {
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return ports, err
		}
		defer conn.Close()
		ports = append(ports, tcpPort(conn.LocalAddr()))
	}
	return ports, nil
}

func runServer(sigCtx context.Context, args []string) int {
	fs := flag.NewFlagSet("leakydemo server", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "loopback address to listen on")
	holdFor := durationFlag{defaultHold}
	fs.Var(&holdFor, "hold", "how long to run before exiting (max 10m)")
	maxConn := fs.Int("max-conns", serverMaxConn, "stop accepting after this many connections")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if fs.NArg() != 0 {
		return fail(exitUsage, "unexpected arguments: %v", fs.Args())
	}
	if *maxConn < 0 || *maxConn > serverMaxConn {
		return fail(exitUsage, "--max-conns must be in 0..%d", serverMaxConn)
	}
	host, _, err := checkLoopback(*listen)
	if err != nil {
		return fail(exitUsage, "--listen: %v", err)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fail(exitRuntime, "listen: %v", err)
	}
	port := tcpPort(ln.Addr())
	go serveLeaky(ln, *maxConn)
	printLine("READY", struct {
		Pid   int     `json:"pid"`
		Mode  string  `json:"mode"`
		Host  string  `json:"host"`
		Port  int     `json:"port"`
		Addr  string  `json:"addr"`
		HoldS float64 `json:"hold_s"`
	}{os.Getpid(), "server", host, port, net.JoinHostPort(host, strconv.Itoa(port)), holdFor.d.Seconds()})
	hold(sigCtx, holdFor.d)
	return 0
}

func runClient(sigCtx context.Context, args []string) int {
	fs := flag.NewFlagSet("leakydemo client", flag.ContinueOnError)
	addr := fs.String("addr", "", "loopback HOST:PORT to dial, e.g. 127.0.0.1:8080 or [::1]:8080")
	leak := fs.Int("leak", 0, "connections to dial in main.leakyDial and never close")
	ok := fs.Int("ok", 0, "connections to dial in main.properDial and close")
	holdFor := durationFlag{defaultHold}
	fs.Var(&holdFor, "hold", "how long to hold after READY before exiting (max 10m)")
	closeAfter := durationFlag{0}
	fs.Var(&closeAfter, "close-leaked-after", "if > 0, close the leaked connections this long after READY")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if fs.NArg() != 0 {
		return fail(exitUsage, "unexpected arguments: %v", fs.Args())
	}
	if *addr == "" {
		return fail(exitUsage, "--addr is required")
	}
	if _, _, err := checkLoopback(*addr); err != nil {
		return fail(exitUsage, "--addr: %v", err)
	}
	if *leak < 0 || *ok < 0 || *leak+*ok > maxConns {
		return fail(exitUsage, "--leak and --ok must be >= 0 with a sum of at most %d", maxConns)
	}

	ctx, cancel := context.WithTimeout(sigCtx, setupTimeout)
	defer cancel()
	conns, err := leakyDial(ctx, *addr, *leak)
	if err != nil {
		if sigCtx.Err() != nil {
			return 0
		}
		return fail(exitRuntime, "leakyDial %s: %v", *addr, err)
	}
	okPorts, err := properDial(ctx, *addr, *ok)
	if err != nil {
		if sigCtx.Err() != nil {
			return 0
		}
		return fail(exitRuntime, "properDial %s: %v", *addr, err)
	}
	leakedPorts := make([]int, 0, len(conns))
	for _, c := range conns {
		leakedPorts = append(leakedPorts, tcpPort(c.LocalAddr()))
	}
	printLine("READY", struct {
		Pid          int     `json:"pid"`
		Mode         string  `json:"mode"`
		Addr         string  `json:"addr"`
		Leaked       int     `json:"leaked"`
		Ok           int     `json:"ok"`
		LeakedPorts  []int   `json:"leaked_local_ports"`
		OkPorts      []int   `json:"ok_local_ports"`
		HoldS        float64 `json:"hold_s"`
		CloseLeakedS float64 `json:"close_leaked_after_s"`
	}{os.Getpid(), "client", *addr, len(conns), len(okPorts), leakedPorts, okPorts,
		holdFor.d.Seconds(), closeAfter.d.Seconds()})

	deadline := time.Now().Add(holdFor.d)
	if closeAfter.d > 0 && closeAfter.d < holdFor.d {
		hold(sigCtx, closeAfter.d)
		if sigCtx.Err() != nil {
			return 0
		}
		for _, c := range conns {
			c.Close()
		}
		printLine("CLOSED", struct {
			Pid    int `json:"pid"`
			Closed int `json:"closed"`
		}{os.Getpid(), len(conns)})
	}
	hold(sigCtx, time.Until(deadline))
	return 0
}

func usage() int {
	fmt.Fprintln(os.Stderr, "usage: leakydemo server --listen 127.0.0.1:0 [--hold 10s]")
	fmt.Fprintln(os.Stderr, "       leakydemo client --addr HOST:PORT --leak N --ok M [--hold 10s] [--close-leaked-after 0s]")
	return exitUsage
}

func main() {
	// SIGTERM / SIGINT / SIGHUP end the hold early; the program then exits 0.
	sigCtx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer stop()
	if len(os.Args) < 2 {
		os.Exit(usage())
	}
	var code int
	switch os.Args[1] {
	case "server":
		code = runServer(sigCtx, os.Args[2:])
	case "client":
		code = runClient(sigCtx, os.Args[2:])
	default:
		code = usage()
	}
	os.Exit(code)
}
