// SPDX-License-Identifier: GPL-2.0
/* Start-up probe: does this kernel let us load fentry/fexit programs?
 * (Some hosts refuse them with EPERM by policy.) */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

SEC("fexit/inet_csk_accept")
int BPF_PROG(probe_fexit)
{
	return 0;
}
