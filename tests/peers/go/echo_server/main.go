// A grpc-go server with one bidirectional method, /interop.Echo/Bidi,
// registered from a raw ServiceDesc, for tests/grpc_go_interop.rs. What a
// call does is chosen by its `x-mode` metadata:
//
//	echo  (default) response headers serverid=go-server and x-echo-id=<x-id>,
//	      every message echoed, status 0 after the client half-closes;
//	error echo the first message, then end with INVALID_ARGUMENT and -message;
//	hold  echo until the client cancels, and remember that it did;
//	probe answer one message, "yes" once a hold call was seen cancelled.
//
// Prints "LISTENING <addr>" once serving; serves until killed.
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"konnwire"
)

var cancelled int32

func first(md metadata.MD, key string) string {
	if v := md.Get(key); len(v) > 0 {
		return v[0]
	}
	return ""
}

func bidi(errorMessage string) grpc.StreamHandler {
	return func(_ interface{}, stream grpc.ServerStream) error {
		md, _ := metadata.FromIncomingContext(stream.Context())
		mode := first(md, "x-mode")
		switch mode {
		case "probe":
			answer := []byte("no")
			if atomic.LoadInt32(&cancelled) == 1 {
				answer = []byte("yes")
			}
			return stream.SendMsg(&answer)
		case "", "echo":
			stream.SetHeader(metadata.Pairs("serverid", "go-server", "x-echo-id", first(md, "x-id")))
		}
		for {
			var msg []byte
			if err := stream.RecvMsg(&msg); err == io.EOF {
				return nil
			} else if err != nil {
				if mode == "hold" && status.Code(err) == codes.Canceled {
					atomic.StoreInt32(&cancelled, 1)
				}
				return err
			}
			if err := stream.SendMsg(&msg); err != nil {
				return err
			}
			if mode == "error" {
				return status.Error(codes.InvalidArgument, errorMessage)
			}
		}
	}
}

func main() {
	listen := flag.String("listen", "", "tcp://HOST:PORT (mTLS) or unix:///PATH (h2c)")
	cert := flag.String("cert", "", "server certificate (tcp)")
	key := flag.String("key", "", "server key (tcp)")
	ca := flag.String("ca", "", "CA of client certificates (tcp)")
	minTime := flag.Duration("min-time", 0, "keepalive EnforcementPolicy.MinTime with PermitWithoutStream; 0 keeps grpc-go's default policy")
	errorMessage := flag.String("error-message", "", "the message of the error mode")
	flag.Parse()
	konnwire.Register()

	var opts []grpc.ServerOption
	var lis net.Listener
	var err error
	if path := strings.TrimPrefix(*listen, "unix://"); path != *listen {
		lis, err = net.Listen("unix", path)
	} else {
		lis, err = net.Listen("tcp", strings.TrimPrefix(*listen, "tcp://"))
		opts = append(opts, grpc.Creds(credentials.NewTLS(konnwire.TLSConfig(*cert, *key, *ca, "", true))))
	}
	konnwire.Check(err, "listen")
	if *minTime > 0 {
		opts = append(opts, grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: *minTime, PermitWithoutStream: true}))
	}
	server := grpc.NewServer(opts...)
	server.RegisterService(&grpc.ServiceDesc{
		ServiceName: "interop.Echo",
		HandlerType: (*interface{})(nil),
		Streams: []grpc.StreamDesc{{
			StreamName:    "Bidi",
			Handler:       bidi(*errorMessage),
			ServerStreams: true,
			ClientStreams: true,
		}},
	}, struct{}{})
	fmt.Printf("LISTENING %s\n", lis.Addr())
	os.Stdout.Sync()
	go func() {
		// The test kills us; this only bounds a forgotten process.
		time.Sleep(10 * time.Minute)
		os.Exit(3)
	}()
	konnwire.Check(server.Serve(lis), "serve")
}
