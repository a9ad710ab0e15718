// A grpc-go client for tests/grpc_go_interop.rs, driving /interop.Echo/Bidi
// on our grpc::Server (same modes as ../echo_server): concurrent echo calls
// on one connection, byte-exact, with metadata both ways; an error status
// with a message; a cancelled call the server must notice. Prints "OK ..."
// lines and "PASS", or "FAIL ..." and exits 1.
package main

import (
	"context"
	"crypto/sha256"
	"flag"
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"konnwire"
)

const method = "/interop.Echo/Bidi"

var desc = &grpc.StreamDesc{StreamName: "Bidi", ServerStreams: true, ClientStreams: true}

var sizes = []int{1, 7, 100, 1000, 16384, 16385, 65536, 1 << 20, 4<<20 - 5}

func echo(ctx context.Context, conn *grpc.ClientConn, index int, total int, pool []byte) error {
	ctx = metadata.AppendToOutgoingContext(ctx, "x-mode", "echo", "x-id", fmt.Sprint(index))
	stream, err := conn.NewStream(ctx, desc, method)
	if err != nil {
		return err
	}
	sent := sha256.New()
	sendErr := make(chan error, 1)
	go func() {
		n := 0
		for i := 0; n < total; i++ {
			size := sizes[i%len(sizes)]
			if size > total-n {
				size = total - n
			}
			off := (i*977 + index) % 4096
			chunk := pool[off : off+size]
			sent.Write(chunk)
			if err := stream.SendMsg(&chunk); err != nil {
				sendErr <- fmt.Errorf("send: %v", err)
				return
			}
			n += size
		}
		sendErr <- stream.CloseSend()
	}()
	header, err := stream.Header()
	if err != nil {
		return fmt.Errorf("header: %v", err)
	}
	if got := header.Get("x-echo-id"); len(got) != 1 || got[0] != fmt.Sprint(index) {
		return fmt.Errorf("x-echo-id %v", got)
	}
	if got := header.Get("serverid"); len(got) != 1 || got[0] != "rust-server" {
		return fmt.Errorf("serverid %v", got)
	}
	got := sha256.New()
	received := 0
	for {
		var msg []byte
		err := stream.RecvMsg(&msg)
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("recv after %d bytes: %v", received, err)
		}
		got.Write(msg)
		received += len(msg)
	}
	if err := <-sendErr; err != nil {
		return err
	}
	if received != total {
		return fmt.Errorf("received %d of %d bytes", received, total)
	}
	if string(got.Sum(nil)) != string(sent.Sum(nil)) {
		return fmt.Errorf("echoed bytes differ")
	}
	return nil
}

func call(ctx context.Context, conn *grpc.ClientConn, mode string, msg []byte) (grpc.ClientStream, []byte, error) {
	ctx = metadata.AppendToOutgoingContext(ctx, "x-mode", mode)
	stream, err := conn.NewStream(ctx, desc, method)
	if err != nil {
		return nil, nil, err
	}
	// io.EOF: the server ended the call before taking the message (it
	// may answer without reading, as the probe mode does); the answer
	// and the status are RecvMsg's.
	if err := stream.SendMsg(&msg); err != nil && err != io.EOF {
		return nil, nil, err
	}
	var reply []byte
	err = stream.RecvMsg(&reply)
	return stream, reply, err
}

func main() {
	target := flag.String("target", "", "unix:///PATH (h2c) or HOST:PORT (mTLS)")
	cert := flag.String("cert", "", "client certificate (mTLS)")
	key := flag.String("key", "", "client key (mTLS)")
	ca := flag.String("ca", "", "CA of the server certificate (mTLS)")
	streams := flag.Int("streams", 3, "concurrent echo calls")
	mib := flag.Int("mib", 32, "MiB each way per call")
	errorMessage := flag.String("error-message", "", "the expected message of the error mode")
	flag.Parse()
	konnwire.Register()

	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	creds := grpc.WithInsecure()
	if *cert != "" {
		creds = grpc.WithTransportCredentials(credentials.NewTLS(konnwire.TLSConfig(*cert, *key, *ca, "127.0.0.1", false)))
	}
	conn, err := grpc.DialContext(ctx, *target, creds, grpc.WithBlock())
	konnwire.Check(err, "dial")
	defer conn.Close()

	pool := konnwire.Pattern(sizes[len(sizes)-1]+4096, 7)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, *streams)
	for i := 0; i < *streams; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs[i] = echo(ctx, conn, i+1, *mib<<20, pool)
		}(i)
	}
	wg.Wait()
	for i, err := range errs {
		konnwire.Check(err, fmt.Sprintf("echo call %d", i+1))
	}
	fmt.Printf("OK echo %d calls x %d MiB each way in %v\n", *streams, *mib, time.Since(start).Round(time.Millisecond))

	stream, reply, err := call(ctx, conn, "error", []byte("first"))
	konnwire.Check(err, "error mode: first message")
	konnwire.Expect(string(reply) == "first", "error mode echoed %q", reply)
	var extra []byte
	err = stream.RecvMsg(&extra)
	st, _ := status.FromError(err)
	konnwire.Expect(st.Code() == codes.InvalidArgument && st.Message() == *errorMessage,
		"error mode ended with %v %q", st.Code(), st.Message())
	fmt.Printf("OK error status %d %q\n", st.Code(), st.Message())

	holdCtx, cancelHold := context.WithCancel(ctx)
	_, reply, err = call(holdCtx, conn, "hold", []byte("x"))
	konnwire.Check(err, "hold mode")
	konnwire.Expect(string(reply) == "x", "hold mode echoed %q", reply)
	cancelHold()
	for {
		_, reply, err := call(ctx, conn, "probe", []byte("?"))
		konnwire.Check(err, "probe")
		if string(reply) == "yes" {
			break
		}
		if ctx.Err() != nil {
			konnwire.Fail("the server never saw the cancellation")
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Println("OK cancel seen by the server")
	fmt.Println("PASS")
}
