"""Chapter V's CPUID table for each vCPU, as a pure function of KVM's supported list."""
from __future__ import annotations

from lguest.host.cpuid import (CPUID_1_ECX_HYPERVISOR, CPUID_1_ECX_TSC_DEADLINE,
                               KVM_CPUID_SIGNATURE, CpuidEntry, cpuid_for_vcpu)

SUPPORTED = [CpuidEntry(0, 0, 0, 0xD, 0x68747541, 0x444D4163, 0x69746E65),
             CpuidEntry(1, 0, 0, 0x00A00F11, 0x00000800, 0x7ED8320B, 0x178BFBFF)]


def leaf(table: list[CpuidEntry], function: int) -> CpuidEntry:
    return next(e for e in table if e.function == function)


def test_the_deadline_timer_is_offered_only_when_kvm_says_it_has_one():
    assert not SUPPORTED[1].ecx & CPUID_1_ECX_TSC_DEADLINE
    offered = leaf(cpuid_for_vcpu(SUPPORTED, 0, 1, deadline=True), 1)
    plain = leaf(cpuid_for_vcpu(SUPPORTED, 0, 1), 1)
    assert offered.ecx & CPUID_1_ECX_TSC_DEADLINE
    assert not plain.ecx & CPUID_1_ECX_TSC_DEADLINE
    assert offered.ecx & ~CPUID_1_ECX_TSC_DEADLINE == plain.ecx   # nothing else moves
    assert plain.ecx & CPUID_1_ECX_HYPERVISOR


def test_each_vcpu_is_told_its_own_apic_id_and_the_kvm_signature():
    for index in range(3):
        table = cpuid_for_vcpu(SUPPORTED, index, 3)
        assert leaf(table, 1).ebx >> 24 == index
        assert leaf(table, 1).ebx >> 16 & 0xFF == 3
        assert any(e.function == KVM_CPUID_SIGNATURE for e in table)
