// SPDX-License-Identifier: Apache-2.0 OR MIT
//
// The sockmap forwarder's kernel half (crates/ingress/src/sockmap.rs loads it): a stream
// verdict program that sends every byte a socket receives out of its paired socket, so a
// relayed connection's data never reaches the proxy's userspace.
//
// `peers` is a SOCKHASH keyed by socket cookie: the proxy stores the upstream socket under the
// client socket's cookie and the client socket under the upstream's. The program looks up the
// receiving socket's own cookie and redirects to the egress of whatever socket is stored
// there. A cookie key, rather than the classic index pair i <-> i^1 of a SOCKMAP, needs no
// slot allocator in userspace and no second map from socket to index in the kernel.
//
// Build: clang -O2 -g -target bpf -c redirect.c -o redirect.o (libbpf's bpf_helpers.h).

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} peers SEC(".maps");

SEC("sk_skb/stream_verdict")
int redirect(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);

	// No peer (the pair is being torn down): drop, as a closed peer would.
	return bpf_sk_redirect_hash(skb, &peers, &cookie, 0);
}

char _license[] SEC("license") = "Dual MIT/GPL";
