{{/* Chart name (nameOverride replaces it), truncated to the DNS label limit. */}}
{{- define "ddm-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: fullnameOverride if set; else the release name when it contains the name
     (`ddm-operator-team-a`); else the name alone when the release name is its first word (`ddm` gives
     `ddm-operator`, never `ddm-ddm-operator`); else release-name. */}}
{{- define "ddm-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "ddm-operator.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else if hasPrefix (printf "%s-" .Release.Name) $name }}
{{- $name }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels that select the operator pod; never change after install. */}}
{{- define "ddm-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ddm-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "ddm-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ddm-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "ddm-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ddm-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Application rules: what the operator does to DDMs and their children. Narrowest verbs:
     no delete (children go with their owner through the garbage collector), no update (merge patches only). */}}
{{- define "ddm-operator.applicationRules" -}}
- apiGroups: ["ddm.io"]
  resources: ["decentralizeddiffusions"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["ddm.io"]
  resources: ["decentralizeddiffusions/status"]
  verbs: ["patch"]
# children carry blockOwnerDeletion: with OwnerReferencesPermissionEnforcement that needs update on the owner's finalizers
- apiGroups: ["ddm.io"]
  resources: ["decentralizeddiffusions/finalizers"]
  verbs: ["update"]
{{- if eq .Values.jobBackend "pytorchjob" }}
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- else if eq .Values.jobBackend "trainjob" }}
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# one TrainingRuntime per stage attempt, beside its TrainJob (the pod template a TrainJob cannot carry)
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainingruntimes"]
  verbs: ["get", "create"]
{{- else }}
{{- fail (printf "jobBackend must be pytorchjob or trainjob, not %q" .Values.jobBackend) }}
{{- end }}
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create"]
# spec.suspend of a DDM whose jobs Kueue manages sets their Workloads' spec.active (found by Kueue's job-uid label)
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
# a failed job's exit code is only in its pods' container statuses
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- if .Values.rbac.readSecrets }}
# only the Secrets a DDM names (storage.credentialsSecret, placement.targetCluster), by name: get, never list or watch
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
{{- end }}

{{/* Framework rules (namespaced part): kopf posts Events about the objects it handles. */}}
{{- define "ddm-operator.frameworkNamespacedRules" -}}
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
