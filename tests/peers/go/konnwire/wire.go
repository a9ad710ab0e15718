// Package konnwire is shared by the grpc-go peers of tests/grpc_go_interop.rs:
// a raw gRPC codec (messages are *[]byte, so no protoc is needed) and the
// Konnectivity Packet encoded and decoded by hand with protowire, following
// tests/proto/konnectivity.proto field by field.
package konnwire

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io/ioutil"
	"os"

	"google.golang.org/grpc/encoding"
	"google.golang.org/protobuf/encoding/protowire"
)

// Codec passes message bytes through untouched. Its name is "proto" so the
// wire says application/grpc+proto exactly as a generated stub would.
type Codec struct{}

func (Codec) Marshal(v interface{}) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("raw codec: %T is not *[]byte", v)
	}
	return *b, nil
}

func (Codec) Unmarshal(data []byte, v interface{}) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("raw codec: %T is not *[]byte", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (Codec) Name() string { return "proto" }

// Register replaces the default proto codec process-wide (grpc-go 1.33 has
// no ForceServerCodec; this works for clients and servers alike).
func Register() { encoding.RegisterCodec(Codec{}) }

// PacketType values.
const (
	DialReq  = 0
	DialRsp  = 1
	CloseReq = 2
	CloseRsp = 3
	Data     = 4
	DialCls  = 5
	Drain    = 6
)

var typeNames = []string{"DIAL_REQ", "DIAL_RSP", "CLOSE_REQ", "CLOSE_RSP", "DATA", "DIAL_CLS", "DRAIN"}

// Packet is the decoded union of every payload's fields.
type Packet struct {
	Type      int
	Protocol  string
	Address   string
	Random    int64
	ConnectID int64
	Error     string
	Data      []byte
}

func (p Packet) String() string {
	name := fmt.Sprint(p.Type)
	if p.Type >= 0 && p.Type < len(typeNames) {
		name = typeNames[p.Type]
	}
	return fmt.Sprintf("%s{random=%d connectID=%d error=%q address=%q data=%dB}",
		name, p.Random, p.ConnectID, p.Error, p.Address, len(p.Data))
}

func varint(b []byte, num protowire.Number, v int64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, uint64(v))
}

func str(b []byte, num protowire.Number, v []byte) []byte {
	if len(v) == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

// Encode writes the packet with the payload field its type implies.
func (p Packet) Encode() []byte {
	var inner []byte
	var field protowire.Number
	switch p.Type {
	case DialReq:
		field = 2
		inner = str(inner, 1, []byte(p.Protocol))
		inner = str(inner, 2, []byte(p.Address))
		inner = varint(inner, 3, p.Random)
	case DialRsp:
		field = 3
		inner = str(inner, 1, []byte(p.Error))
		inner = varint(inner, 2, p.ConnectID)
		inner = varint(inner, 3, p.Random)
	case Data:
		field = 4
		inner = varint(inner, 1, p.ConnectID)
		inner = str(inner, 2, []byte(p.Error))
		inner = str(inner, 3, p.Data)
	case CloseReq:
		field = 5
		inner = varint(inner, 1, p.ConnectID)
	case CloseRsp:
		field = 6
		inner = str(inner, 1, []byte(p.Error))
		inner = varint(inner, 2, p.ConnectID)
	case DialCls:
		field = 7
		inner = varint(inner, 1, p.Random)
	case Drain:
		field = 8
	}
	out := varint(nil, 1, int64(p.Type))
	out = protowire.AppendTag(out, field, protowire.BytesType)
	return protowire.AppendBytes(out, inner)
}

type fieldFn func(num protowire.Number, typ protowire.Type, b []byte) (int, error)

func walk(b []byte, f fieldFn) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		used, err := f(num, typ, b)
		if err != nil {
			return err
		}
		if used == 0 {
			used = protowire.ConsumeFieldValue(num, typ, b)
		}
		if used < 0 {
			return protowire.ParseError(used)
		}
		b = b[used:]
	}
	return nil
}

// Decode parses a Packet; unknown fields are skipped.
func Decode(b []byte) (Packet, error) {
	var p Packet
	err := walk(b, func(num protowire.Number, typ protowire.Type, b []byte) (int, error) {
		if num == 1 && typ == protowire.VarintType {
			v, n := protowire.ConsumeVarint(b)
			p.Type = int(v)
			return n, nil
		}
		if num < 2 || num > 8 || typ != protowire.BytesType {
			return 0, nil
		}
		inner, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return n, nil
		}
		return n, walk(inner, func(f protowire.Number, t protowire.Type, b []byte) (int, error) {
			if t == protowire.VarintType {
				v, n := protowire.ConsumeVarint(b)
				switch {
				case (num == 2 || num == 3) && f == 3, num == 7 && f == 1:
					p.Random = int64(v)
				case num == 3 && f == 2, num == 4 && f == 1, num == 5 && f == 1, num == 6 && f == 2:
					p.ConnectID = int64(v)
				}
				return n, nil
			}
			if t == protowire.BytesType {
				v, n := protowire.ConsumeBytes(b)
				switch {
				case num == 2 && f == 1:
					p.Protocol = string(v)
				case num == 2 && f == 2:
					p.Address = string(v)
				case (num == 3 || num == 6) && f == 1, num == 4 && f == 2:
					p.Error = string(v)
				case num == 4 && f == 3:
					p.Data = append([]byte(nil), v...)
				}
				return n, nil
			}
			return 0, nil
		})
	})
	return p, err
}

// Pattern returns n deterministic bytes that differ per seed.
func Pattern(n int, seed uint64) []byte {
	x := seed*0x9e3779b97f4a7c15 + 1
	out := make([]byte, n)
	for i := range out {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		out[i] = byte(x)
	}
	return out
}

// Hash is the hex SHA-256 of b.
func Hash(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// TLSConfig loads a certificate and key and a CA. As a server, client
// certificates signed by the CA are required; as a client, the server's
// certificate is verified against the CA for serverName.
func TLSConfig(certFile, keyFile, caFile, serverName string, server bool) *tls.Config {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	Check(err, "loading key pair")
	pem, err := ioutil.ReadFile(caFile)
	Check(err, "reading CA")
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		Fail("no certificate in %s", caFile)
	}
	config := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}}
	if server {
		config.ClientCAs = pool
		config.ClientAuth = tls.RequireAndVerifyClientCert
	} else {
		config.RootCAs = pool
		config.ServerName = serverName
	}
	return config
}

// Fail prints FAIL and the reason on stdout and exits 1.
func Fail(format string, args ...interface{}) {
	fmt.Printf("FAIL "+format+"\n", args...)
	os.Exit(1)
}

// Check fails on a non-nil error.
func Check(err error, what string) {
	if err != nil {
		Fail("%s: %v", what, err)
	}
}

// Expect fails unless cond holds.
func Expect(cond bool, format string, args ...interface{}) {
	if !cond {
		Fail(format, args...)
	}
}
